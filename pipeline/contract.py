"""The one loader contract every backend honours, the objects that cross its boundary, and the device-side
normalisation the backends share.

    loader = build_loader(data_dir, "train", batch_size=256, resolution=160, placement=Placement("cuda"),
                          options=LoaderOptions(workers=8))
    for images, labels in loader: ...
    # images: (B, 3, R, R) on placement.device, channels_last, ImageNet-normalised, placement.dtype
    # labels: (B,) int64 on placement.device, class index in sorted-wnid (ImageFolder) order

What a backend is given: a `Request` (split, batch size, resolution, seed, drop_last: what the caller wants), a
`Placement` (device, dtype, rank, world size: where the batches go and which shard is read) and `LoaderOptions`
(backend, workers, crops, FFCV's and DALI's own options, the skip list). `workers=-1` means this rank's share of the
cores minus one, for every backend (`auto_workers`).

Epochs: `set_epoch(e, start_batch)` chooses what the next `for` loop yields: epoch e's batches from `start_batch` on
(no sample repeated, none skipped). When a loop runs to the end, the loader moves on to the next epoch by itself, so
calling set_epoch every epoch is optional; breaking out of a loop does not advance it. (epoch, start_batch) is the
whole position: every backend's order, crops and flips are pure functions of (seed, epoch, sample index), so a
mid-epoch checkpoint needs nothing else to resume exactly.

`close()` frees what the loader holds (threads, worker processes, pinned and device buffers) now rather than at
garbage collection; a later loop builds what it needs again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dataset_tools.processes import usable_cores, workers_problem
from pipeline.order import EpochPlan, batches_per_rank, plan_epoch

# ImageNet statistics on the 0..255 scale: loaders hand uint8 pixels to the device and normalise there.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
VAL_CROP_RATIO = 224 / 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Request:
    """What the caller wants from a loader: which split, in batches of how many, at which side, with which seed;
    drop_last: every batch full (training) or every sample once (validation)."""

    split: str
    batch_size: int
    resolution: int
    seed: int = 0
    drop_last: bool = True


@dataclass(frozen=True)
class Placement:
    """Where the batches go and which shard this process reads: made once per process from the distributed context
    and the precision (training.components.make_loader), the same for its train and val loaders."""

    device: torch.device | str = "cuda"
    dtype: torch.dtype = torch.float16
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        # frozen, so set through object: backends read device.type and device.index, which a string has not
        object.__setattr__(self, "device", torch.device(self.device))
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in 0..{self.world_size - 1}")


@dataclass(frozen=True)
class Crops:
    """The crops every backend cuts (pipeline.crops): RandomResizedCrop's scale and ratio ranges for train; for val
    the centre square whose side is val_crop_ratio x the shorter side."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    val_crop_ratio: float = VAL_CROP_RATIO


@dataclass(frozen=True)
class FFCVOptions:
    """ffcv backend only (pipeline.ffcv_loader): os_cache maps the betons and lets the page cache hold them (False:
    FFCV's process cache, for betons bigger than RAM); order "random" or "quasi_random" (page-grouped)."""

    os_cache: bool = True
    order: str = "random"


@dataclass(frozen=True)
class DALIOptions:
    """dali backend only (pipeline.dali_loader, pipeline.dali_tuning). source: "beton" (`split`.beton), "folder"
    (`split`/<wnid>/) or "auto" (the beton when there is one). The knobs (None, 0 or negative: the GPU kind's
    default): hw_decoder_load (share of JPEGs sent to the A100/H100/H200 hardware decoder), threads, prefetch
    (batches queued ahead), nvjpeg_padding_mb (nvJPEG's device and host buffers)."""

    source: str = "auto"
    hw_decoder_load: float | None = None
    threads: int = 0
    prefetch: int = 0
    nvjpeg_padding_mb: int | None = None
    feed_thread: bool = False  # drive the pipeline from a thread of its own (pipeline.dali_loader, "Feed thread")


@dataclass(frozen=True)
class LoaderOptions:
    """How to load: the backend ("auto" picks one, pipeline.build.choose_backend), worker threads or processes (-1:
    `auto_workers`), the crops, each backend's own options (a backend reads its own and no other), and
    skip_listed_in: a convert_report.json whose skipped (undecodable) files the folder backends leave out, so they
    see the samples the beton has and DALI does not stop on them."""

    backend: str = "auto"
    workers: int = -1
    crops: Crops = field(default_factory=Crops)
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)
    skip_listed_in: str | Path | None = None


def auto_workers(workers: int) -> int:
    """workers < 0 ("auto"): this rank's share of the cores it may run on (LOCAL_WORLD_SIZE ranks per machine, set by
    torchrun), minus one left to the training process itself (its Python loop, the kernel launches, the thread that
    feeds the decoders); at least 1. Otherwise `workers` as given, if the machine can run them (`workers_problem`)."""
    if workers >= 0:
        problem = workers_problem(workers)
        if problem:
            raise ValueError(problem)
        return int(workers)
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


class TooFewSamples(ValueError):
    """The split cannot give every rank one batch (with drop_last, one full batch)."""

    def __init__(self, samples: int, split: str, batch_size: int, world_size: int, drop_last: bool) -> None:
        self.samples, self.split, self.batch_size, self.world_size = samples, split, batch_size, world_size
        need = batch_size * world_size if drop_last else world_size
        super().__init__(
            f"{samples} {split} samples cannot give each of {world_size} rank{'s' if world_size > 1 else ''} one "
            f"{'full batch of ' + str(batch_size) if drop_last else 'batch'} ({need} needed)"
        )


class LoaderError(RuntimeError):
    """The loader itself failed -- a worker process died, shared memory ran out -- rather than a sample or a folder.
    One line that says what happened and the fix; the run stops instead of waiting for a batch that never comes."""


class SampleError(RuntimeError):
    """A sample a loader cannot turn into pixels (damaged bytes, an unreadable file). The message is one line that
    names the sample (file, index, label) and the fix; the loader stops rather than hand out garbage."""


def error_chain(e: BaseException) -> str:
    """One line: the exception's first line and each chained cause's behind it ("A: x <- B: y"). DALI reports every
    execution-time error as "Current pipeline object is no longer valid" and keeps the real cause (a crop window, a
    damaged sample) in the chain, so a message without the chain would lose it."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        first = (str(e).strip().splitlines() or [""])[0][:300]
        parts.append(f"{type(e).__name__}: {first}")
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return " <- ".join(parts)


def normalize_nhwc(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> `dtype` (B, 3, H, W) channels_last, (x - mean) / std with ImageNet statistics.

    Permuting NHWC to NCHW is free and *is* the channels_last layout, so no copy is spent on the memory format.
    The arithmetic runs in float32 and is cast once, so float16/bfloat16 outputs carry one rounding only."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got shape {tuple(images.shape)}")
    return normalize(images.permute(0, 3, 1, 2).float(), dtype)


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32 (B, 3, H, W) pixels on the 0..255 scale -> `dtype`, ImageNet-normalised, channels_last."""
    mean, _, inv_std = _statistics(pixels.device)
    return ((pixels - mean) * inv_std).to(dtype=dtype, memory_format=torch.channels_last)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`: float32 (B, 3, H, W) on the 0..255 scale, same memory format (for the colour
    operations of pipeline.augment, and for pictures)."""
    mean, std, _ = _statistics(images.device)
    return images.float() * std + mean


@functools.lru_cache(maxsize=8)
def _statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # made once per device: building them per batch would be small blocking host-to-device copies each time
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(device), std.to(device), (1.0 / std).to(device)


def to_device(host: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Small host tensors (per-sample augmentation parameters) on `device` with one copy that does not block the
    host: packed into one float32 buffer (exact for the integers involved, all below 2**24), pinned on CUDA and
    copied with non_blocking=True, then split and cast back on the device. A pageable or blocking copy per tensor
    would stall the host at every batch until the GPU caught up with it."""
    if not host:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in host])
    if device.type == "cuda":
        flat = flat.pin_memory()  # the caching host allocator keeps it alive until the copy has run
    packed = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in host:
        part = packed[start : start + t.numel()].view(t.shape)
        out.append(part if t.dtype == torch.float32 else part.to(t.dtype))
        start += t.numel()
    return out


def device_batches(
    source: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    dtype: torch.dtype,
    source_reuses_buffers: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Move uint8 NHWC CPU batches to `device` and normalise them there.

    On CUDA the next batch is copied and normalised on a side stream while the caller works on the current one
    (timm's PrefetchLoader idea). `source_reuses_buffers`: the source overwrites a batch's memory once the one after
    it has been taken (FFCV's ring of pinned buffers), so the copy must have finished before we take the next."""
    if device.type != "cuda":
        for images, labels in source:
            # clone(): on the CPU .to() would alias the source's buffer, which FFCV overwrites a few batches later.
            yield normalize_nhwc(images.to(device), dtype), labels.to(device=device, dtype=torch.int64).clone()
        return
    stream = torch.cuda.Stream(device=device)
    pending = None
    copied: torch.cuda.Event | None = None
    it = iter(source)
    while True:
        if source_reuses_buffers and copied is not None:
            copied.synchronize()
        try:
            images, labels = next(it)
        except StopIteration:
            break
        with torch.cuda.stream(stream):
            x = images.to(device, non_blocking=True)
            y = labels.to(device, non_blocking=True).to(torch.int64).view(-1)
            copied = torch.cuda.Event()
            copied.record(stream)
            x = normalize_nhwc(x, dtype)
            ready = torch.cuda.Event()
            ready.record(stream)
        if pending is not None:
            yield _hand_over(*pending)
        pending = (x, y, ready)
    if pending is not None:
        yield _hand_over(*pending)


def _hand_over(x: torch.Tensor, y: torch.Tensor, ready: torch.cuda.Event) -> tuple[torch.Tensor, torch.Tensor]:
    current = torch.cuda.current_stream(x.device)
    current.wait_event(ready)
    # The tensors were allocated on the side stream; tell the caching allocator the caller's stream uses them.
    x.record_stream(current)
    y.record_stream(current)
    return x, y


class Loader:
    """Base of every backend. Subclasses set `backend`, call `__init__` with what they found in the data (the sample
    count and the class list) and implement `_batches(plan, start_batch, resolution)`, which yields (images, labels)
    already on the device and normalised."""

    backend: str = "?"
    order: str = "random"  # how train epochs are shuffled; the ffcv backend also offers "quasi_random"

    def __init__(self, request: Request, placement: Placement, *, num_samples: int, classes: list[str]) -> None:
        if request.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {request.split!r}")
        self.request, self.placement = request, placement
        self.split = request.split
        self.batch_size = int(request.batch_size)
        self.resolution = _check_resolution(request.resolution)
        self.num_samples = int(num_samples)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.drop_last = bool(request.drop_last)
        self.rank, self.world_size = placement.rank, placement.world_size
        self.seed = int(request.seed)
        self.device, self.dtype = placement.device, placement.dtype
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "device is cuda but torch sees no GPU; use Placement(device='cpu') (every backend runs on the CPU)"
            )
        self.epoch = 0
        self.start_batch = 0
        self._len = batches_per_rank(self.num_samples, self.world_size, self.batch_size, self.drop_last)
        if self._len == 0:
            raise TooFewSamples(self.num_samples, self.split, self.batch_size, self.world_size, self.drop_last)

    @property
    def shuffle(self) -> bool:
        return self.split == "train"

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in 0..{len(self)}, got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def set_resolution(self, resolution: int) -> None:
        """Output side of the next epoch's images (progressive resizing). Takes effect at the next `for` loop."""
        self.resolution = _check_resolution(resolution)

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The dataset indices this rank reads in `epoch` (default: the next one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        cached = getattr(self, "_cached_plan", None)
        if cached is None or cached[0] != epoch:  # num_valid() asks once per batch; an ImageNet plan costs ~30 ms
            cached = (epoch, self._make_plan(epoch))
            self._cached_plan = cached
        return cached[1]

    def _make_plan(self, epoch: int, **how) -> EpochPlan:
        """`how`: plan_epoch's order/shard options, for a backend with an order of its own."""
        return plan_epoch(
            self.num_samples,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            **how,
        )

    def num_valid(self, batch_index: int, epoch: int | None = None) -> int:
        """Leading samples of batch `batch_index` that are real, not padding (drop_last=False under DDP)."""
        return self.plan(epoch).num_valid(batch_index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan, start, resolution = self.plan(), self.start_batch, self.resolution
        yield from self._batches(plan, start, resolution)
        self.epoch, self.start_batch = self.epoch + 1, 0

    def _batches(
        self, plan: EpochPlan, start_batch: int, resolution: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the loader holds now (see the module's notes); backends holding such things override it."""

    def describe(self) -> str:
        return (
            f"{self.backend} {self.split}: {self.num_samples} images, {self.num_classes} classes, "
            f"{len(self)} batches of {self.batch_size} per rank at {self.resolution} px "
            f"(rank {self.rank}/{self.world_size}, {self.device}, {str(self.dtype).replace('torch.', '')})"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def _check_resolution(r: int) -> int:
    if int(r) != r or r < 8:
        raise ValueError(f"resolution must be an integer >= 8 px, got {r}")
    return int(r)
