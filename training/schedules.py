"""LR (and momentum) schedules and the progressive-resolution schedule, as pure functions of the step or epoch.

A schedule holds no state besides the global optimizer step the trainer keeps, so resuming (even mid-epoch, later)
is `lr_at(step)` again. Steps count optimizer updates: with gradient accumulation, one step = `grad_accum` batches.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from training.config import TrainConfig


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def _lin(start: float, end: float, pct: float) -> float:
    return start + (end - start) * pct


def onecycle_value(step: int, total_steps: int, pct_start: float, start: float, peak: float, end: float) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's two-phase cosine curve (three_phase=False) at `step`.

    Phase boundaries follow torch exactly: the peak is at step `pct_start * total_steps - 1` (a float), the end at
    `total_steps - 1`. Used for the LR (start -> peak -> end) and, reversed, for the momentum.
    """
    up_end = float(pct_start * total_steps) - 1
    down_end = float(total_steps - 1)
    step = min(max(step, 0), total_steps - 1)
    if step <= up_end:
        return _cos_anneal(start, peak, step / up_end if up_end > 0 else 1.0)
    return _cos_anneal(peak, end, (step - up_end) / (down_end - up_end))


@dataclass(frozen=True)
class Schedule:
    """LR (and optionally momentum) at every optimizer step of a run. `total_steps = epochs * steps_per_epoch`."""

    kind: str
    max_lr: float
    steps_per_epoch: int
    epochs: int
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    lr_peak_epoch: float = 2.0
    warmup_epochs: float = 0.0
    step_epochs: tuple[int, ...] = ()
    step_gamma: float = 0.1

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        if self.kind == "onecycle":
            initial = self.max_lr / self.div_factor
            return onecycle_value(
                step, self.total_steps, self.pct_start, initial, self.max_lr, initial / self.final_div_factor
            )
        epoch = step / self.steps_per_epoch  # fractional epoch, so every schedule moves per step
        if self.kind == "triangular":
            # ffcv-imagenet's "cyclic": 1e-4*lr at 0 -> lr at lr_peak_epoch -> 0 at the last epoch, linear.
            if epoch <= self.lr_peak_epoch:
                return _lin(1e-4 * self.max_lr, self.max_lr, epoch / self.lr_peak_epoch)
            return max(0.0, _lin(self.max_lr, 0.0, (epoch - self.lr_peak_epoch) / (self.epochs - self.lr_peak_epoch)))
        if epoch < self.warmup_epochs:
            return _lin(self.max_lr / self.div_factor, self.max_lr, epoch / self.warmup_epochs)
        if self.kind == "cosine":
            pct = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs)
            return _cos_anneal(self.max_lr, 0.0, min(pct, 1.0))
        if self.kind == "step":
            return self.max_lr * self.step_gamma ** bisect.bisect_right(self.step_epochs, math.floor(epoch))
        raise ValueError(f"unknown LR schedule {self.kind!r}")

    def momentum_at(self, step: int) -> float | None:
        """None: leave the optimizer's momentum alone."""
        if self.kind != "onecycle" or not self.cycle_momentum:
            return None
        return onecycle_value(
            step, self.total_steps, self.pct_start, self.max_momentum, self.base_momentum, self.max_momentum
        )

    def state_dict(self, step: int) -> dict:
        """What a checkpoint records: enough to notice a resumed run whose schedule would differ."""
        return {
            "kind": self.kind,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "max_lr": self.max_lr,
            "step": step,
        }


def effective_max_lr(cfg: TrainConfig, world_size: int) -> float:
    """max_lr, linearly rescaled to the global batch when cfg.lr_ref_batch is set."""
    if cfg.lr_ref_batch <= 0:
        return cfg.max_lr
    return cfg.max_lr * cfg.batch_size * world_size * cfg.grad_accum / cfg.lr_ref_batch


def build_schedule(cfg: TrainConfig, steps_per_epoch: int, world_size: int) -> Schedule:
    return Schedule(
        kind=cfg.lr_schedule,
        max_lr=effective_max_lr(cfg, world_size),
        steps_per_epoch=steps_per_epoch,
        epochs=cfg.epochs,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
        cycle_momentum=cfg.cycle_momentum,
        base_momentum=cfg.base_momentum,
        max_momentum=cfg.max_momentum,
        lr_peak_epoch=cfg.lr_peak_epoch,
        warmup_epochs=cfg.warmup_epochs,
        step_epochs=tuple(cfg.step_epochs),
        step_gamma=cfg.step_gamma,
    )


def apply_schedule(optimizer, schedule: Schedule, step: int) -> float:
    """Set every param group's LR (and momentum, for onecycle) for `step`; returns the LR."""
    lr = schedule.lr_at(step)
    momentum = schedule.momentum_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            group["momentum"] = momentum
    return lr


def resolution_at(epoch: int, min_res: int, max_res: int, start_ramp: int, end_ramp: int, step: int = 32) -> int:
    """ffcv-imagenet's progressive resizing: min_res up to start_ramp, max_res from end_ramp, linear in between,
    rounded to a multiple of `step` (so cuDNN sees few distinct shapes)."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    res = _lin(min_res, max_res, (epoch - start_ramp) / (end_ramp - start_ramp))
    return int(round(res / step)) * step


def train_resolution(cfg: TrainConfig, epoch: int) -> int:
    if not cfg.progressive:
        return cfg.res
    return resolution_at(epoch, cfg.min_res, cfg.max_res, cfg.start_ramp, cfg.end_ramp, cfg.res_step)
