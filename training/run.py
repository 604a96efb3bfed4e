"""One training run's state: the `Run` (what it is made of, where it stands, how it saves and stops). Its set-up,
from the config to a Run restored from its checkpoint, is training.setup; training.trainer drives it epoch by epoch.
`pack` (the run into a checkpoint) and `restore` (a checkpoint into the run) stand side by side: what one writes, the
other reads.
"""

from __future__ import annotations

import contextlib
import errno
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import Loader
from training import checkpoint as ckpt
from training.checkpoint import START, Checkpoint, Position
from training.config import TrainConfig, to_dict
from training.distributed import DistContext, all_gather_object, barrier, broadcast_buffers, on_rank0
from training.ema import ModelEMA
from training.engine import BatchTransform, EpochProgress, EpochStats, Precision, TrainParts
from training.logs import RunLog
from training.resume import ResumeError, check_compatible, check_position
from training.schedules import Schedule, train_resolution
from training.signals import StepControl, exit_code, signal_name


class SetupError(RuntimeError):
    """The run cannot start as configured; the message says why and what to change."""


class WriteError(RuntimeError):
    """A checkpoint or log file could not be written (a full or read-only disk); the previous files are intact."""


def write_failure(e: OSError, what: str) -> str:
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return (
        f"could not write {e.filename or what} ({e.strerror or e}); the previous checkpoint is intact: "
        f"{'free space there' if full else 'make it writable'} and continue with --resume"
    )


def log0(ctx: DistContext, msg: str) -> None:
    if ctx.is_main:
        print(msg, flush=True)


def run_resolution(cfg: TrainConfig, epoch: int) -> int:
    """The training resolution of `epoch`; past the last epoch (a finished run) the last epoch's. `Run.resolution`,
    and what training.setup builds the train loader at before the Run exists."""
    return train_resolution(cfg, min(epoch, cfg.epochs - 1))


@dataclass
class Run:
    cfg: TrainConfig  # final: run_name and num_classes resolved, never changed afterwards
    ctx: DistContext
    group: object  # the CPU process group for host-side agreements (None without DDP)
    precision: Precision
    train_loader: Loader
    val_loader: Loader
    parts: TrainParts
    eval_model: nn.Module  # the compiled module without DDP
    schedule: Schedule
    steps_per_epoch: int
    augment: BatchTransform | None
    control: StepControl
    ckpt_dir: Path
    position: Position = START  # where this process starts (a resumed checkpoint's position)
    runlog: RunLog | None = None  # rank 0 only
    best_top1: float = -1.0
    last_record: dict | None = None  # the last logged epoch's record; travels in every checkpoint
    last_saved: Position = START  # what checkpoint.pt holds now
    threads: int = field(default_factory=torch.get_num_threads)
    warm_ups: dict[int, float] = field(default_factory=dict)  # resolution -> seconds of its first step
    lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the run folder's lock (rank 0)

    def resolution(self, epoch: int) -> int:
        return run_resolution(self.cfg, epoch)

    def note_warm_up(self, resolution: int, seconds: float) -> None:
        """The first step at a resolution compiles the step (or captures its graph): say how long it took, and keep
        it in the run header of the log."""
        if self.parts.step_mode == "eager" or resolution in self.warm_ups or seconds <= 0:
            return
        self.warm_ups[resolution] = seconds
        text = ", ".join(f"{r} px {s:.1f} s" for r, s in self.warm_ups.items())
        line = f"- warm-up: first step per resolution, {self.parts.step_mode} included: {text}"
        if self.runlog is not None:
            lines = [x for x in self.runlog.header_lines if not x.startswith("- warm-up:")]
            self.runlog.header_lines = lines + [line]
        log0(self.ctx, line[2:])

    # ---- positions

    def resume_point(self, epoch: int) -> tuple[int, EpochProgress | None]:
        """(first loader batch, running sums so far) of `epoch`: where a mid-epoch checkpoint left it, else (0, None)."""
        start = self.position
        if start.phase == "mid_epoch" and epoch == start.epoch:
            return start.batch, start.progress
        return 0, None

    def mid_epoch_position(self, epoch: int, steps_done: int, progress: EpochProgress) -> Position:
        return Position(
            epoch=epoch,
            batch=steps_done * self.cfg.grad_accum,
            step=epoch * self.steps_per_epoch + steps_done,
            phase="mid_epoch",
            progress=progress,
        )

    def after_training(self, epoch: int, phase: str, pending: EpochStats | None = None) -> Position:
        """Epoch `epoch` trained: before its validation (with its training stats), or validated and logged."""
        return Position(epoch=epoch + 1, batch=0, step=(epoch + 1) * self.steps_per_epoch, phase=phase, pending=pending)

    def describe(self, at: Position) -> str:
        return at.describe(self.steps_per_epoch, self.cfg.grad_accum)

    # ---- the run into a checkpoint, and a checkpoint into the run

    def pack(self, at: Position, **extra) -> dict | None:
        """The run's checkpoint at `at` on rank 0, None elsewhere. Every rank must call it (it gathers RNG states)."""
        rng = all_gather_object(ckpt.rng_state(), self.ctx, self.group)
        if not self.ctx.is_main:
            return None
        cfg, p = self.cfg, self.parts
        loader = {
            "seed": cfg.seed,
            "resolution": self.resolution(at.epoch),
            "world_size": self.ctx.world_size,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "num_samples": self.train_loader.num_samples,
            "backend": self.train_loader.backend,
            "order": self.train_loader.order,
        }
        return ckpt.pack(
            at,
            run_name=cfg.run_name,
            model=p.raw_model.state_dict(),
            optimizer=p.optimizer.state_dict(),
            scheduler=self.schedule.state_dict(at.step),
            scaler=p.scaler.state_dict(),
            ema=p.ema.state_dict() if p.ema else None,
            loader=loader,
            rng=rng,
            config=to_dict(cfg),
            classes=self.train_loader.classes,
            best_top1=self.best_top1,
            threads=self.threads if cfg.deterministic else None,
            metrics=self.last_record,
            **extra,
        )

    def restore(self, saved: Checkpoint) -> None:
        """What `pack` wrote, back into the run: checked first (refused whole, before a tensor is copied), then the
        model, optimizer, scaler, EMA, this rank's RNGs, the thread count of a --deterministic run, the best top-1
        and the last log record. Warns where the resumed run differs from the saved one."""
        cfg, ctx, parts, pos = self.cfg, self.ctx, self.parts, saved.position
        for warning in self._fits(saved):
            log0(ctx, f"warning: {warning}")
        parts.raw_model.load_state_dict(saved.weights())
        parts.optimizer.load_state_dict(saved.optimizer)
        parts.scaler.load_state_dict(saved.scaler)
        if parts.ema is not None and saved.ema is None:
            log0(ctx, "warning: the checkpoint has no EMA; starting one from the current weights")
            parts.ema = ModelEMA(parts.raw_model, cfg.ema_decay)
            if parts.graphed is not None:
                parts.graphed.ema = parts.ema
        elif parts.ema is not None:
            parts.ema.load_state_dict(saved.ema)
        before, now = saved.scheduler, self.schedule
        if before["total_steps"] != now.total_steps or before["max_lr"] != now.max_lr:
            log0(
                ctx,
                f"warning: the LR schedule changed on resume (total steps {before['total_steps']} -> "
                f"{now.total_steps}, max LR {before['max_lr']:.4g} -> {now.max_lr:.4g})",
            )
        rng = saved.rng(ctx.rank, ctx.world_size)
        if rng is not None:
            ckpt.set_rng_state(rng)
        else:
            log0(ctx, f"warning: RNG states saved by another number of ranks, running {ctx.world_size}; reseeding")
        if cfg.deterministic and saved.threads and saved.threads != torch.get_num_threads():
            log0(
                ctx, f"--deterministic: {saved.threads} CPU threads as in the saved run (not {torch.get_num_threads()})"
            )
            torch.set_num_threads(saved.threads)
            self.threads = saved.threads
        if pos.phase == "mid_epoch":
            self._warn_mid_epoch_changes(saved)
        self.best_top1, self.last_record = saved.best_top1, saved.metrics
        best = f", best top-1 {self.best_top1:.2f}%" if self.best_top1 >= 0 else ""
        log0(ctx, f"resumed {saved.path}: {self.describe(pos)}{best}")

    def _fits(self, saved: Checkpoint) -> list[str]:
        """Refuse a checkpoint that does not fit this run (SetupError naming the file and the fix); return the
        warnings for what changed but may."""
        cfg, loader, parts, pos = self.cfg, self.train_loader, self.parts, saved.position
        try:
            check_compatible(
                saved,
                arch=cfg.arch,
                classes=loader.classes,
                data_dir=cfg.data_dir,
                model=parts.raw_model,
                optimizer=parts.optimizer,
                ema_module=parts.ema.module if parts.ema else None,
            )
            warnings = check_position(
                saved,
                world_size=self.ctx.world_size,
                batch_size=cfg.batch_size,
                grad_accum=cfg.grad_accum,
                seed=cfg.seed,
                num_samples=loader.num_samples,
                order=loader.order,
            )
        except ResumeError as e:
            raise SetupError(str(e)) from None
        if pos.phase == "mid_epoch" and pos.batch % cfg.grad_accum:
            raise SetupError(
                f"{saved.path}: loader batch {pos.batch} is not a multiple of --grad-accum {cfg.grad_accum}"
            )
        return warnings

    def _warn_mid_epoch_changes(self, saved: Checkpoint) -> None:
        """An epoch continued in the middle with another backend or resolution: the same samples, other pixels."""
        ctx, loader, epoch = self.ctx, self.train_loader, saved.position.epoch
        backend = saved.loader.get("backend", loader.backend)
        if backend != loader.backend:
            log0(
                ctx,
                f"warning: epoch {epoch} was started with the {backend} loader and continues with "
                f"{loader.backend}: the same samples, but their crops differ from the interrupted run's",
            )
        saved_res, res = saved.loader.get("resolution"), self.resolution(epoch)
        if saved_res and saved_res != res:
            log0(
                ctx,
                f"warning: epoch {epoch} was training at {saved_res} px, this config says {res} px "
                "(progressive resizing flags changed?)",
            )

    # ---- writing checkpoints

    def save(self, at: Position) -> None:
        """checkpoint.pt := the run at `at` (mid-epoch or before validation). Every rank calls it."""
        self._commit(self.pack(at), lambda state: ckpt.save_latest(state, self.ckpt_dir), self.ckpt_dir / ckpt.LATEST)
        self.control.saved()
        self.last_saved = at

    def _commit(self, state: dict | None, write: Callable[[dict], object], where: Path) -> None:
        """Rank 0 writes `state` (the others have None); a full or read-only disk stops every rank with one line."""
        on_rank0(
            self.ctx,
            lambda: write(state),
            lambda e: write_failure(e, str(where)) if isinstance(e, OSError) else None,
            WriteError,
        )

    def save_epoch(self, epoch: int, record: dict, is_best: bool) -> None:
        """The end of a validated epoch: checkpoint.pt, model_XXX.pt, best.pt if it is, and the log line."""
        self.last_record = record
        fingerprints = all_gather_object(weight_fingerprint(self.parts.raw_model), self.ctx, self.group)
        if len(set(fingerprints)) > 1:
            log0(self.ctx, f"warning: ranks hold different weights after epoch {epoch}: {fingerprints}")
        end = self.after_training(epoch, "end_of_epoch")

        def write(state: dict) -> None:
            ckpt.save_checkpoint(state, self.ckpt_dir, epoch, is_best, self.cfg.keep_last)
            self.runlog.epoch(record, self.schedule.lr_at, self.schedule.total_steps, self.steps_per_epoch, end.step)

        self._commit(self.pack(end, rank_weight_fingerprints=fingerprints), write, self.ckpt_dir)
        self.control.saved()
        self.last_saved = end

    def sync_buffers(self) -> None:
        """Rank 0's BatchNorm statistics on every rank (model and EMA) before validating and saving."""
        broadcast_buffers(self.parts.raw_model, self.ctx)
        if self.parts.ema is not None:
            broadcast_buffers(self.parts.ema.module, self.ctx)

    # ---- stopping

    def stopped(self, at: Position) -> int:
        """A stop signal was honoured with the checkpoint at `at` written (or already current): say how to go on,
        return the exit code (128 + the signal: schedulers restart the job, which resumes)."""
        barrier(self.ctx, self.group)  # no rank exits while rank 0 is still writing
        signum, cfg = self.control.stop_signal, self.cfg
        if not (self.ckpt_dir / ckpt.LATEST).is_file():  # stopped before the first checkpoint (a stuck loader)
            log0(
                self.ctx,
                f"rn50 train: {signal_name(signum)} received: stopped before the first checkpoint; "
                f"the same command starts the run over (exit code {exit_code(signum)})",
            )
            return exit_code(signum)
        log0(
            self.ctx,
            f"rn50 train: {signal_name(signum)} received: stopped with the checkpoint at {self.describe(at)}"
            f"; continue with --run-name {shlex.quote(cfg.run_name)} --output-dir {shlex.quote(str(cfg.output_dir))} "
            f"--resume (exit code "
            f"{exit_code(signum)})",
        )
        return exit_code(signum)

    def close(self) -> None:
        """Flush the TensorBoard events written so far (also after a stop or an error), free what the loaders hold
        (worker processes, DALI's pipeline) and release the run's lock."""
        if self.runlog is not None:
            self.runlog.close()
        self.train_loader.close()
        self.val_loader.close()
        self.lock.close()


def weight_fingerprint(model: nn.Module) -> float:
    """A scalar that differs when two copies of the model's parameters differ (for the DDP in-sync check)."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        for i, p in enumerate(model.parameters()):
            total += (i + 1) * p.double().sum() + p.double().square().sum()
    return float(total)
