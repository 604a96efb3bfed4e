"""Where a checkpoint says the run stands, and the checks that a checkpoint fits this run before anything is loaded.

A checkpoint is written at one of three points (its "phase"):
- "mid_epoch": inside epoch E after S optimizer steps (`--checkpoint-every`, `--checkpoint-minutes`, or a stop
  signal). The loader position is (E, S * grad_accum); the epoch's running sums come along so its log line is whole.
- "before_validation": epoch E's training finished, its validation has not (written before validating whenever
  mid-epoch checkpoints are on, or when a stop arrives during validation). Resuming re-runs only the validation.
- "end_of_epoch": epoch E validated and logged; the run continues at epoch E + 1, batch 0.

Refusal rules: every check runs before any tensor is copied into the model, so a checkpoint is either loaded whole
or not at all. A different architecture, class list or tensor shape is refused. A mid-epoch position is refused when
the number of ranks, the batch size, the accumulation, the seed, the sample order (--loader-order) or the dataset
size differ, because the rest of the epoch would then be cut into other shards (samples repeated or skipped); at
epoch boundaries those may change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint import epoch_file
from training.engine import EpochProgress, EpochStats

PHASES = ("mid_epoch", "before_validation", "end_of_epoch")


class ResumeError(ValueError):
    """The checkpoint cannot continue this run; the message names the file and the fix."""


@dataclass(frozen=True)
class Position:
    """Where training continues: epoch `epoch` from loader batch `batch`, global optimizer step `step`."""

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


def position_of(state: dict) -> Position:
    phase = state.get("phase", "end_of_epoch")  # checkpoints from before mid-epoch resume were all epoch ends
    loader = state.get("loader") or {}
    progress = EpochProgress.from_state(state["epoch_progress"]) if phase == "mid_epoch" else None
    pending = EpochStats.from_state(state["epoch_stats"]) if phase == "before_validation" else None
    return Position(epoch=int(state["next_epoch"]), batch=int(loader.get("batch", 0)), step=int(state["step"]),
                    phase=phase, progress=progress, pending=pending)


def _fix(path: Path) -> str:
    return f"start a new --run-name, or delete {path.parent} to start this run over"


def _check_tensors(what: str, saved: object, built: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ResumeError(f"{path}: its {what} is not a dict of tensors (damaged?); {_fix(path)}")
    missing = [k for k in built if k not in saved]
    extra = [k for k in saved if k not in built]
    if missing or extra:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "") if part)
        raise ResumeError(f"{path}: its {what} does not fit this run's {arch} ({detail}; another --arch or "
                          f"--blurpool?); {_fix(path)}")
    for k, t in built.items():
        s = saved[k]
        if s.shape != t.shape or s.dtype != t.dtype:
            raise ResumeError(f"{path}: its {what} does not fit this run's {arch} ({k}: saved {tuple(s.shape)} "
                              f"{str(s.dtype).replace('torch.', '')}, built {tuple(t.shape)} "
                              f"{str(t.dtype).replace('torch.', '')}); {_fix(path)}")


def check_compatible(state: dict, path: Path, *, arch: str, classes: list[str], data_dir: str,
                     model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema_module: torch.nn.Module | None
                     ) -> None:
    """Raise ResumeError unless every part of `state` fits the objects this run built (nothing is modified)."""
    required = ("model", "optimizer", "scheduler", "scaler", "step", "next_epoch", "config")
    missing = [k for k in required if k not in state]
    if missing:
        raise ResumeError(f"{path}: incomplete checkpoint (no {', '.join(missing)}); {_fix(path)}")
    phase = state.get("phase", "end_of_epoch")
    if phase not in PHASES:
        raise ResumeError(f"{path}: unknown checkpoint phase {phase!r} (written by a newer rn50?); {_fix(path)}")
    if phase == "mid_epoch" and not isinstance(state.get("epoch_progress"), dict):
        raise ResumeError(f"{path}: a mid-epoch checkpoint without its epoch progress (damaged?); {_fix(path)}")
    if phase == "before_validation" and not isinstance(state.get("epoch_stats"), dict):
        raise ResumeError(f"{path}: a before-validation checkpoint without its epoch stats (damaged?); {_fix(path)}")
    saved_arch = state["config"].get("arch")
    if saved_arch and saved_arch != arch:
        raise ResumeError(f"{path}: holds a {saved_arch}, this run builds a {arch}; resume with --arch {saved_arch}, "
                          f"or {_fix(path)}")
    saved_classes = state.get("classes") or []
    if saved_classes and saved_classes != classes:
        how = (f"{len(saved_classes)} classes, {data_dir} has {len(classes)}" if len(saved_classes) != len(classes)
               else f"classes that {data_dir} names or orders differently")
        raise ResumeError(f"{path}: the run was trained on {how}; resume with the run's --data-dir, or {_fix(path)}")
    _check_tensors("model", state["model"], model.state_dict(), path, arch)
    saved_opt, built_opt = state["optimizer"], optimizer.state_dict()
    if not isinstance(saved_opt, dict) or not isinstance(saved_opt.get("param_groups"), list):
        raise ResumeError(f"{path}: its optimizer state is not an SGD state dict (damaged?); {_fix(path)}")
    sizes = [len(g.get("params", [])) for g in saved_opt["param_groups"]]
    if sizes != [len(g["params"]) for g in built_opt["param_groups"]]:
        raise ResumeError(f"{path}: its optimizer has parameter groups of sizes {sizes}, this run "
                          f"{[len(g['params']) for g in built_opt['param_groups']]} (another weight-decay split or "
                          f"model); {_fix(path)}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, st in (saved_opt.get("state") or {}).items():
        buf = st.get("momentum_buffer") if isinstance(st, dict) else None
        if not isinstance(pid, int) or not 0 <= pid < len(params) or (
                buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != params[pid].shape)):
            raise ResumeError(f"{path}: its optimizer state does not fit this run's parameters (entry {pid}); "
                              f"{_fix(path)}")
    if ema_module is not None and state.get("ema") is not None:
        ema = state["ema"]
        if not isinstance(ema, dict) or "module" not in ema:
            raise ResumeError(f"{path}: its EMA entry is damaged; {_fix(path)}")
        _check_tensors("EMA", ema["module"], ema_module.state_dict(), path, arch)


def check_position(state: dict, path: Path, *, world_size: int, batch_size: int, grad_accum: int, seed: int,
                   num_samples: int, order: str = "random") -> list[str]:
    """Refuse a mid-epoch position that this run would shard differently; return warnings for changes that are
    harmless at an epoch boundary."""
    phase = state.get("phase", "end_of_epoch")
    loader = state.get("loader") or {}
    ours = {"world_size": world_size, "batch_size": batch_size, "grad_accum": grad_accum, "seed": seed,
            "num_samples": num_samples, "order": order}
    changed = {k: (loader[k], v) for k, v in ours.items() if k in loader and loader[k] != v}
    if not changed:
        return []
    if phase == "mid_epoch":
        epoch = int(state["next_epoch"])
        previous = path.with_name(epoch_file(epoch - 1))
        alt = (f", or copy {previous.name} over {path.name} to resume from the start of epoch {epoch}"
               if previous.is_file() else "")
        text = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items())
        raise ResumeError(f"{path}: written in the middle of epoch {epoch} with {text}; the rest of that epoch would "
                          "be sharded differently (samples repeated or skipped). Resume with the same number of "
                          f"processes, --batch-size, --grad-accum, --seed, --loader-order and dataset{alt}")
    text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    return [f"resuming at an epoch boundary with {text}: the next epochs follow the new setting"]
