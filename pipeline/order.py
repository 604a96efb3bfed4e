"""Which samples a rank reads in an epoch, and in what order: a pure function of (seed, epoch), the same for every
backend, so it can be checkpointed and resumed mid-epoch.

Sharding (like torch's DistributedSampler, but ours so FFCV and DALI follow it too):
- drop_last=True: every rank gets `num_samples // (world_size * batch_size)` full batches; the samples past that are
  left out of this epoch (which ones changes every epoch because the order is shuffled).
- drop_last=False: the order is padded by repeating its first samples until it divides by `world_size`; rank r takes
  every world_size-th sample starting at r, so at most one sample per rank is a repeat and it is the last sample of
  that rank's last batch. `EpochPlan.num_real` counts the real ones (the trainer's distributed eval masks the rest).
  Every rank has the same number of batches; the last batch may be smaller than `batch_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    indices: np.ndarray  # int64 dataset indices this rank reads this epoch, in order (padding included)
    num_real: int  # the first num_real entries are real; the rest repeat samples of other ranks (drop_last=False)
    batch_size: int

    @property
    def num_batches(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def batch(self, b: int) -> np.ndarray:
        return self.indices[b * self.batch_size : (b + 1) * self.batch_size]

    def num_valid(self, b: int) -> int:
        """How many leading samples of batch `b` are real (not padding)."""
        start = b * self.batch_size
        stop = min(start + self.batch_size, len(self.indices))
        return max(0, min(stop, self.num_real) - start)


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return num_samples // (world_size * batch_size)
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """All dataset indices in this epoch's order (identity when not shuffling)."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    # A fresh generator per (seed, epoch): no state carried between epochs, so any epoch can be recomputed alone.
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x0DE4])
    return rng.permutation(num_samples).astype(np.int64)


def page_grouped_order(sample_pages: np.ndarray, seed: int, epoch: int, window_pages: int) -> np.ndarray:
    """A quasi-random order for reading a file bigger than RAM: pages in a (seed, epoch) shuffled order, samples
    shuffled within each window of `window_pages` consecutive pages, so a stretch of batches needs few pages."""
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x9A6E])
    pages = np.unique(sample_pages)
    position = np.zeros(int(pages.max()) + 1, dtype=np.int64)
    position[pages[rng.permutation(len(pages))]] = np.arange(len(pages))
    window = position[sample_pages] // max(1, window_pages)
    return np.lexsort((rng.random(len(sample_pages)), window)).astype(np.int64)


def plan_epoch(
    num_samples: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    batch_size: int,
    drop_last: bool,
    order: np.ndarray | None = None,
    shard: str = "interleave",
) -> EpochPlan:
    """This rank's part of the epoch. `order`: a precomputed order of all samples (default `epoch_order`).
    shard="interleave": rank r takes every world_size-th sample (like DistributedSampler); "block": rank r takes the
    r-th contiguous block, which keeps a page-grouped order's locality per rank. Padding (drop_last=False) always
    sits at the end of a rank's samples."""
    if shard not in ("interleave", "block"):
        raise ValueError(f"shard must be interleave or block, got {shard!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_samples < 1:
        raise ValueError("the dataset is empty")
    if order is None:
        order = epoch_order(num_samples, seed, epoch, shuffle)
    elif len(order) != num_samples:
        raise ValueError(f"order has {len(order)} entries for {num_samples} samples")
    if drop_last:
        per_rank = num_samples // (world_size * batch_size) * batch_size
        if per_rank == 0:
            raise ValueError(
                f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} "
                "ranks with drop_last=True; lower the batch size or use drop_last=False"
            )
        used = order[: per_rank * world_size]
        mine = used[rank::world_size] if shard == "interleave" else used[rank * per_rank : (rank + 1) * per_rank]
        return EpochPlan(np.ascontiguousarray(mine, dtype=np.int64), per_rank, batch_size)
    per_rank = math.ceil(num_samples / world_size)
    padded = np.resize(order, per_rank * world_size)  # np.resize repeats from the start
    if shard == "interleave":
        mine = padded[rank::world_size]
        num_real = len(range(rank, num_samples, world_size))
    else:
        mine = padded[rank * per_rank : (rank + 1) * per_rank]
        num_real = min(max(num_samples - rank * per_rank, 0), per_rank)
    return EpochPlan(np.ascontiguousarray(mine, dtype=np.int64), num_real, batch_size)
