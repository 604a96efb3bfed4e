"""Checkpoints: one function writes them, atomically; one reads them, with weights_only=True.

Layout under `<output_dir>/checkpoints/<run>/`:
    checkpoint.pt    the latest state (what --resume reads): an epoch end, or mid-epoch (--checkpoint-every, a signal)
    model_000.pt ... the state after each epoch (0-based), hard links to the bytes of checkpoint.pt when possible
    best.pt          the state of the epoch with the best validation top-1
    config.yaml      the run's resolved config (read by --resume before torch is imported)

A checkpoint is a dict of plain containers and tensors only (no pickled classes), so `torch.load(weights_only=True)`
reads it: model (unwrapped, uncompiled state_dict), optimizer, scheduler (step bookkeeping), scaler, ema, epoch and
step counters, the loader position (epoch, batch, seed, resolution, ranks, batch size), the phase (training.resume)
with the epoch's running sums, the loaders' own states where a backend has one (DALI), the RNG states of every rank,
the last epoch's log record, and the config. The RNG states are gathered to rank 0 into this one file rather than
written one file per rank: a single os.replace then commits the whole run's state at once, with no moment where
ranks' files disagree, and they are small (a few kB per rank).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
LATEST = "checkpoint.pt"
BEST = "best.pt"
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there (a run's checkpoints live in "
                                f"<output-dir>/checkpoints/<run-name>/)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        # weights_only=True refuses pickled classes and code: a file that needs them is not ours, or was tampered with
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"{path}: not a readable rn50 checkpoint, damaged or truncated or not ours "
                         f"({type(e).__name__}: {first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise ValueError(f"{path}: not an rn50 checkpoint of format {FORMAT_VERSION} (written by another tool?)")
    return state


# ---------------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """This process's RNG states as plain containers (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    # weights_only loading returns the inner tuple as a list; random.setstate wants the exact tuple shape.
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
