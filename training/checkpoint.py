"""Checkpoints: the one module that knows their format and their files.

`pack` builds a checkpoint's state, `save_checkpoint`/`save_latest` write it atomically, and `Checkpoint.read`
(weights_only=True) is what every reader goes through: --resume (training.resume checks it, the trainer restores it),
`rn50 eval`, and the tests. training.layout names the files (--resume looks for them before torch is imported).

Layout under `<output_dir>/checkpoints/<run>/`:
    checkpoint.pt    the latest state (what --resume reads): an epoch end, or mid-epoch (--checkpoint-every, a signal)
    model_000.pt ... the state after each epoch (0-based), hard links to the bytes of checkpoint.pt when possible
    best.pt          the state of the epoch with the best validation top-1
    config.yaml      the run's resolved config (training.layout.CONFIG)

A checkpoint is a dict of plain containers and tensors only (no pickled classes), so `torch.load(weights_only=True)`
reads it: model (unwrapped, uncompiled state_dict), optimizer, scheduler (step bookkeeping), scaler, ema, epoch and
step counters, the loader position (epoch, batch, seed, resolution, ranks, batch size: every backend's order and
crops are pure functions of these, so no loader state is kept), the phase (`Position`) with the epoch's running sums,
the RNG states of every rank, the last epoch's log record, and the config. (Checkpoints written before this carry a
"loader_states" entry of Nones; it is ignored.) The RNG states are gathered to rank 0 into this one file rather than
written one file per rank: a single os.replace then commits the whole run's state at once, with no moment where
ranks' files disagree, and they are small (a few kB per rank).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.engine import EpochProgress, EpochStats
from training.layout import BEST, LATEST

FORMAT_VERSION = 1  # format 1: "epoch" (last finished) and "next_epoch" both; the loader position under "loader"
PHASES = ("mid_epoch", "before_validation", "end_of_epoch")
_EPOCH_FILE = re.compile(r"^model_(\d+)\.pt$")


def epoch_file(epoch: int) -> str:
    return f"model_{epoch:03d}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then os.replace: a crash (or a spot instance being
    reclaimed) mid-write leaves the previous file intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_unfinished(run_dir: Path) -> list[Path]:
    """Delete temporary files of writes that a kill interrupted (`.<name>.tmp-<pid>`); the files they were meant to
    replace are intact. Call on rank 0 before the run writes anything."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp-*"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except FileNotFoundError:
            pass
    return removed


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes another name for src's bytes (a hard link costs no disk); a copy where links are refused.
    The temp name + os.replace keeps dst whole at every moment, as for the checkpoint itself."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(state: dict, run_dir: Path, epoch: int, is_best: bool, keep_last: int = 0) -> Path:
    """Write the latest checkpoint, the per-epoch file and (if is_best) best.pt; prune old per-epoch files beyond the
    last `keep_last` (0 keeps all). Returns the path of the latest checkpoint. Call on rank 0 only."""
    run_dir = Path(run_dir)
    latest = run_dir / LATEST
    atomic_save(state, latest)
    _link_or_copy(latest, run_dir / epoch_file(epoch))
    if is_best:
        _link_or_copy(latest, run_dir / BEST)
    if keep_last > 0:
        for old in epoch_files(run_dir)[:-keep_last]:
            old.unlink()
    return latest


def save_latest(state: dict, run_dir: Path) -> Path:
    """Replace the latest checkpoint only (mid-epoch and before-validation states). Call on rank 0 only."""
    latest = Path(run_dir) / LATEST
    atomic_save(state, latest)
    return latest


def epoch_files(run_dir: Path) -> list[Path]:
    """Per-epoch checkpoint files, oldest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("model_*.pt") if (m := _EPOCH_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw state of a checkpoint (tests and tools); code that uses it reads through `Checkpoint`."""
    return Checkpoint.read(path, map_location).state


# ---------------------------------------------------------------------------------------------- the format


@dataclass(frozen=True)
class Position:
    """Where training continues: epoch `epoch` from loader batch `batch`, global optimizer step `step`.

    A checkpoint is written at one of three points (its "phase"):
    - "mid_epoch": inside epoch E after S optimizer steps (`--checkpoint-every`, `--checkpoint-minutes`, or a stop
      signal). The loader position is (E, S * grad_accum); the epoch's running sums (`progress`) come along so its
      log line is whole.
    - "before_validation": epoch E's training finished, its validation has not (written before validating whenever
      mid-epoch checkpoints are on, or when a stop arrives during validation); `pending` holds its training stats.
      Resuming re-runs only the validation.
    - "end_of_epoch": epoch E validated and logged; the run continues at epoch E + 1, batch 0.
    """

    epoch: int
    batch: int
    step: int
    phase: str = "end_of_epoch"
    progress: EpochProgress | None = None  # mid_epoch: the running sums of `epoch` so far
    pending: EpochStats | None = None  # before_validation: the finished epoch (epoch - 1)'s training stats

    @property
    def validate_first(self) -> int | None:
        """The epoch whose validation is still to run before training continues, if any."""
        return self.epoch - 1 if self.phase == "before_validation" else None

    def describe(self, steps_per_epoch: int, accum: int) -> str:
        if self.phase == "mid_epoch":
            return f"epoch {self.epoch}, step {self.batch // accum} of {steps_per_epoch} (global step {self.step})"
        if self.phase == "before_validation":
            return f"the end of epoch {self.epoch - 1}'s training, before its validation (step {self.step})"
        return f"the start of epoch {self.epoch} (step {self.step})"


START = Position(epoch=0, batch=0, step=0)


def pack(
    at: Position,
    *,
    run_name: str,
    model: dict,
    optimizer: dict,
    scheduler: dict,
    scaler: dict,
    ema: dict | None,
    loader: dict,
    rng: list[dict],
    config: dict,
    classes: list[str],
    best_top1: float,
    threads: int | None,
    metrics: dict | None,
    **extra,
) -> dict:
    """The checkpoint of a run at `at`. loader: the loader's setting (seed, resolution, ranks, batch size, ...; the
    position is added from `at`); rng: each rank's RNG states; threads: the CPU thread count of a --deterministic run, else None; metrics: the last logged epoch record
    (so a kill between the checkpoint and the log write loses no log line); extra: entries such as
    rank_weight_fingerprints."""
    state = {
        "format": FORMAT_VERSION,
        "run_name": run_name,
        "phase": at.phase,
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "scaler": scaler,
        "ema": ema,
        "epoch": at.epoch - 1,
        "next_epoch": at.epoch,
        "step": at.step,
        "loader": {"epoch": at.epoch, "batch": at.batch, **loader},
        "rng": rng,
        "config": config,
        "classes": classes,
        "best_top1": best_top1,
        "deterministic": {"threads": threads} if threads else None,
        "metrics": metrics,
    }
    if at.phase == "mid_epoch":
        state["epoch_progress"] = at.progress.state_dict()
    elif at.phase == "before_validation":
        state["epoch_stats"] = at.pending.state_dict()
    return {**state, **extra}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint, read through named properties: the dict's keys are this module's business."""

    path: Path
    state: dict

    @classmethod
    def read(cls, path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no checkpoint there (a run's checkpoints live in <output-dir>/checkpoints/<run-name>/)"
            )
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
            # weights_only=True refuses pickled classes and code: a file that needs them is not ours, or was tampered
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ValueError(
                f"{path}: not a readable rn50 checkpoint, damaged or truncated or not ours "
                f"({type(e).__name__}: {first})"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
            raise ValueError(f"{path}: not an rn50 checkpoint of format {FORMAT_VERSION} (written by another tool?)")
        return cls(path, state)

    def incomplete(self) -> str | None:
        """What a run needs from it but it lacks (damaged, or written by another rn50), or None."""
        s = self.state
        missing = [
            k for k in ("model", "optimizer", "scheduler", "scaler", "step", "next_epoch", "config") if k not in s
        ]
        if missing:
            return f"incomplete checkpoint (no {', '.join(missing)})"
        if self.phase not in PHASES:
            return f"unknown checkpoint phase {self.phase!r} (written by a newer rn50?)"
        if self.phase == "mid_epoch" and not isinstance(s.get("epoch_progress"), dict):
            return "a mid-epoch checkpoint without its epoch progress (damaged?)"
        if self.phase == "before_validation" and not isinstance(s.get("epoch_stats"), dict):
            return "a before-validation checkpoint without its epoch stats (damaged?)"
        return None

    @property
    def phase(self) -> str:
        return self.state.get("phase", "end_of_epoch")  # checkpoints from before mid-epoch resume were epoch ends

    @property
    def position(self) -> Position:
        s, phase = self.state, self.phase
        return Position(
            epoch=int(s["next_epoch"]),
            batch=int(self.loader.get("batch", 0)),
            step=int(s["step"]),
            phase=phase,
            progress=EpochProgress.from_state(s["epoch_progress"]) if phase == "mid_epoch" else None,
            pending=EpochStats.from_state(s["epoch_stats"]) if phase == "before_validation" else None,
        )

    @property
    def finished_epoch(self) -> int:
        """The last epoch whose training finished (-1: none yet)."""
        return int(self.state["next_epoch"]) - 1

    @property
    def config(self) -> dict:
        return self.state.get("config") or {}

    @property
    def classes(self) -> list[str]:
        return list(self.state.get("classes") or [])

    @property
    def loader(self) -> dict:
        """The loader's position and setting: epoch, batch, seed, resolution, world_size, batch_size, grad_accum,
        num_samples, backend, order."""
        return self.state.get("loader") or {}

    def rng(self, rank: int, world_size: int) -> dict | None:
        """This rank's RNG states if the checkpoint was written by as many ranks, else None."""
        states = self.state.get("rng") or []
        return states[rank] if len(states) == world_size else None

    @property
    def threads(self) -> int | None:
        """The CPU thread count of a --deterministic run."""
        return (self.state.get("deterministic") or {}).get("threads")

    @property
    def best_top1(self) -> float:
        return float(self.state.get("best_top1", -1.0))

    @property
    def metrics(self) -> dict | None:
        """The last logged epoch record."""
        return self.state.get("metrics")

    @property
    def optimizer(self) -> dict:
        return self.state["optimizer"]

    @property
    def scheduler(self) -> dict:
        return self.state["scheduler"]

    @property
    def scaler(self) -> dict:
        return self.state["scaler"]

    @property
    def ema(self) -> dict | None:
        """{"module", "decay", "updates"} of the EMA, or None."""
        return self.state.get("ema") or None

    def weights(self, ema: bool = False) -> dict:
        """The model's state dict, or the EMA's."""
        return self.state["ema"]["module"] if ema else self.state["model"]


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states as plain containers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    # weights_only loading returns the inner tuple as a list; random.setstate wants the exact tuple shape.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
