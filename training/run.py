"""One training run's state and its set-up: `setup(cfg, ...)` builds a `Run` (loaders, model, optimizer, schedule,
logs, the step control) and, on --resume, restores the checkpoint into it. The Run knows how to write its
checkpoint at a `Position` and how to stop; training.trainer drives it epoch by epoch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from dataset_tools.locks import FolderBusy, folder_lock
from pipeline import Loader
from training import checkpoint as ckpt
from training.checkpoint import START, Checkpoint, Position
from training.components import batch_transform, make_loader, make_parts, seed_everything
from training.config import TrainConfig, dump_yaml, to_dict
from training.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_max_cpu,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cpu_group,
)
from training.ema import ModelEMA
from training.engine import BatchTransform, EpochProgress, EpochStats, Precision, TrainParts, resolve_precision
from training.layout import CONFIG, RunPaths
from training.logs import RunLog
from training.model import sgd_kernels
from training.resume import ResumeError, check_compatible, check_position
from training.schedules import Schedule, build_schedule, train_resolution
from training.signals import StepControl, StopSignals, exit_code, signal_name


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
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the run folder's lock (rank 0)

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

    def mid_epoch(self, epoch: int, steps_done: int, progress: EpochProgress) -> Position:
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

    # ---- checkpoints

    def pack(self, at: Position, **extra) -> dict | None:
        """The run's checkpoint at `at` on rank 0, None elsewhere. Every rank must call it (it gathers RNG states)."""
        rng = all_gather_object(ckpt.rng_state(), self.ctx, self.group)
        if not self.ctx.is_main:
            return None
        cfg, p = self.cfg, self.parts
        loader = {
            "seed": cfg.seed,
            "resolution": train_resolution(cfg, min(at.epoch, cfg.epochs - 1)),
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

    def save(self, at: Position) -> None:
        """checkpoint.pt := the run at `at` (mid-epoch or before validation). Every rank calls it."""
        self._commit(self.pack(at), lambda state: ckpt.save_latest(state, self.ckpt_dir), self.ckpt_dir / ckpt.LATEST)
        self.control.saved()
        self.last_saved = at

    def _commit(self, state: dict | None, write: Callable[[dict], object], where: Path) -> None:
        """Rank 0 writes `state` (the others have None); every rank learns whether it could, so a full or read-only
        disk stops them all together with one line, instead of the others waiting in their next collective."""
        error = None
        if state is not None:
            try:
                write(state)
            except OSError as e:
                error = write_failure(e, str(where))
        error = broadcast_object(error, self.ctx)
        if error:
            raise WriteError(error)

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
        signum, cfg = self.control.stop, self.cfg
        log0(
            self.ctx,
            f"rn50 train: {signal_name(signum)} received: stopped with the checkpoint at {self.describe(at)}"
            f"; continue with --run-name {cfg.run_name} --output-dir {cfg.output_dir} --resume (exit code "
            f"{exit_code(signum)})",
        )
        return exit_code(signum)

    def close(self) -> None:
        """Flush the TensorBoard events written so far (also after a stop or an error); release the run's lock."""
        if self.runlog is not None:
            self.runlog.close()
        self.held.close()


def weight_fingerprint(model: nn.Module) -> float:
    """A scalar that differs when two copies of the model's parameters differ (for the DDP in-sync check)."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        for i, p in enumerate(model.parameters()):
            total += (i + 1) * p.double().sum() + p.double().square().sum()
    return float(total)


# ---------------------------------------------------------------------------------------------- set-up


def setup(cfg: TrainConfig, ctx: DistContext, signals: StopSignals, flags: list[str]) -> Run:
    """Everything before the first step: seeds, the checkpoint to resume, loaders, model, logs, the run header."""
    t_setup = time.perf_counter()
    seed_everything(cfg.seed, ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # fixed shapes per resolution: pick the fastest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.run_name:  # made from rank 0's clock, before anything is written under it
        cfg = replace(cfg, run_name=broadcast_object(f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}", ctx))
    precision = resolve_precision(cfg.precision, ctx.device)
    group = cpu_group(ctx)
    paths = RunPaths(cfg.output_dir, cfg.run_name)
    held = lock_run(paths, ctx)
    try:
        return build_run(cfg, ctx, signals, flags, t_setup, precision, group, paths, held)
    except BaseException:
        held.close()
        raise


def lock_run(paths: RunPaths, ctx: DistContext) -> contextlib.ExitStack:
    """One process writes a run: rank 0 holds the lock of its checkpoint folder (dataset_tools.locks, released by
    the kernel however the process ends) for the whole run; a second run with the same --run-name and --output-dir
    stops here, on every rank, with one line naming the first one's pid. Nothing of the first run is touched."""
    held, busy = contextlib.ExitStack(), None
    if ctx.is_main:
        try:
            held.enter_context(
                folder_lock(
                    paths.checkpoints,
                    "rn50 train",
                    hint="wait for that run to end, or choose another --run-name (or --output-dir)",
                )
            )
        except FolderBusy as e:
            busy = str(e)
        except OSError as e:
            busy = f"{paths.checkpoints}: cannot be created ({e.strerror or e}); choose another --output-dir"
    busy = broadcast_object(busy, ctx)
    if busy:
        held.close()
        raise SetupError(busy)
    return held


def build_run(
    cfg: TrainConfig,
    ctx: DistContext,
    signals: StopSignals,
    flags: list[str],
    t_setup: float,
    precision: Precision,
    group,
    paths: RunPaths,
    held: contextlib.ExitStack,
) -> Run:
    """setup's work once the run folder is ours: the checkpoint to resume, loaders, model, logs."""
    ckpt_dir = paths.checkpoints
    resumed = load_resume_state(cfg, paths.latest, ctx, group) if cfg.resume != "no" else None
    position = resumed.position if resumed else START

    train_loader = make_loader(
        cfg, "train", ctx, precision.input_dtype, resolution=train_resolution(cfg, min(position.epoch, cfg.epochs - 1))
    )
    val_loader = make_loader(cfg, "val", ctx, precision.input_dtype, resolution=cfg.val_res)
    if train_loader.classes != val_loader.classes:
        raise SetupError(f"train and val class lists differ in {cfg.data_dir}")
    if cfg.num_classes and cfg.num_classes != train_loader.num_classes:
        raise SetupError(f"{cfg.data_dir} has {train_loader.num_classes} classes, --num-classes says {cfg.num_classes}")
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch < 1:
        raise SetupError(
            f"{len(train_loader)} batches per rank cannot make one step of --grad-accum "
            f"{cfg.grad_accum}; lower --batch-size or --grad-accum"
        )
    if cfg.deterministic and train_loader.backend == "dali" and ctx.device.type == "cuda":
        log0(
            ctx,
            "--deterministic with DALI on the GPU: order, position and crops resume exactly (they are the "
            "loader's, not DALI's); bit-identical weights are not promised on a GPU (see README)",
        )

    schedule = build_schedule(cfg, steps_per_epoch, ctx.world_size)
    parts, eval_model, counts = make_parts(cfg, train_loader.num_classes, ctx, precision, schedule)
    control = StepControl(
        signals,
        cfg.checkpoint_every,
        cfg.checkpoint_minutes,
        ctx.is_main,
        lambda values: all_reduce_max_cpu(values, ctx, group),
    )
    run = Run(
        cfg=cfg,
        ctx=ctx,
        group=group,
        precision=precision,
        train_loader=train_loader,
        val_loader=val_loader,
        parts=parts,
        eval_model=eval_model,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        augment=batch_transform(cfg, train_loader.num_classes, ctx.rank),
        control=control,
        ckpt_dir=ckpt_dir,
        position=position,
        last_saved=position,
        held=held,
    )
    if resumed is not None:
        restore(run, resumed)
        del resumed  # the model and optimizer hold copies now; free the host memory
    error = None
    if ctx.is_main:
        try:
            open_logs(run, flags, counts, t_setup)
        except OSError as e:
            error = f"{e.filename or cfg.output_dir}: cannot write the run's files there ({e.strerror or e})"
    error = broadcast_object(error, ctx)  # rank 0's failure stops every rank (the others would wait for it)
    if error:
        raise SetupError(f"{error}; choose another --output-dir or free space there")
    return run


def load_resume_state(cfg: TrainConfig, path: Path, ctx: DistContext, group=None) -> Checkpoint | None:
    """The checkpoint to continue from, or None to start (--resume auto without a checkpoint). Every rank reads the
    file itself; they must all see the same one (shared storage for multi-node runs), which is checked."""
    found, error = None, ""
    if cfg.resume == "yes" or (cfg.resume == "auto" and path.is_file()):
        try:
            found = Checkpoint.read(path, map_location="cpu")
        except (FileNotFoundError, ValueError) as e:
            previous = ckpt.epoch_files(path.parent)
            hint = (
                f"; the newest per-epoch file is {previous[-1].name}: copy it over {path.name} to resume from "
                "there, or start a new --run-name"
                if previous
                else f"; start a new --run-name, or delete {path.parent} to start this run over"
            )
            error = f"{e}{hint}"
    seen = all_gather_object(
        (bool(error), found is not None, found and found.position.step, found and found.phase), ctx, group
    )
    if error:
        raise SetupError(error)
    if any(s[0] for s in seen):
        raise SetupError(f"another rank could not read {path} (see its message); every rank must see the same file")
    if len({s[1:] for s in seen}) > 1:
        raise SetupError(
            f"ranks see different checkpoints at {path} ({seen}); put --output-dir on storage every "
            "node shares (EFS, FSx, NFS)"
        )
    return found


def restore(run: Run, saved: Checkpoint) -> None:
    """Check that `saved` fits the run (refused whole, before a tensor is copied), then load it: model, optimizer,
    scaler, EMA, this rank's RNGs and loader state, the best top-1 and the last log record. Warns where the resumed
    run differs from the saved one."""
    cfg, ctx, parts, loader = run.cfg, run.ctx, run.parts, run.train_loader
    pos = saved.position
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
            world_size=ctx.world_size,
            batch_size=cfg.batch_size,
            grad_accum=cfg.grad_accum,
            seed=cfg.seed,
            num_samples=loader.num_samples,
            order=loader.order,
        )
    except ResumeError as e:
        raise SetupError(str(e)) from None
    if pos.phase == "mid_epoch" and pos.batch % cfg.grad_accum:
        raise SetupError(f"{saved.path}: loader batch {pos.batch} is not a multiple of --grad-accum {cfg.grad_accum}")
    for warning in warnings:
        log0(ctx, f"warning: {warning}")

    parts.raw_model.load_state_dict(saved.weights())
    parts.optimizer.load_state_dict(saved.optimizer)
    parts.scaler.load_state_dict(saved.scaler)
    if parts.ema is not None:
        if saved.ema is None:
            log0(ctx, "warning: the checkpoint has no EMA; starting one from the current weights")
            parts.ema = ModelEMA(parts.raw_model, cfg.ema_decay)
            if parts.graphed is not None:
                parts.graphed.ema = parts.ema
        else:
            parts.ema.load_state_dict(saved.ema)
    before, now = saved.scheduler, run.schedule
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
        log0(ctx, f"--deterministic: {saved.threads} CPU threads as in the saved run (not {torch.get_num_threads()})")
        torch.set_num_threads(saved.threads)
        run.threads = saved.threads
    if pos.phase == "mid_epoch":  # the loader continues inside an epoch: say what changed
        backend = saved.loader.get("backend", loader.backend)
        if backend != loader.backend:
            log0(
                ctx,
                f"warning: epoch {pos.epoch} was started with the {backend} loader and continues with "
                f"{loader.backend}: the same samples, but their crops differ from the interrupted run's",
            )
        saved_res, res = saved.loader.get("resolution"), train_resolution(cfg, pos.epoch)
        if saved_res and saved_res != res:
            log0(
                ctx,
                f"warning: epoch {pos.epoch} was training at {saved_res} px, this config says {res} px "
                "(progressive resizing flags changed?)",
            )
    run.best_top1 = saved.best_top1
    run.last_record = saved.metrics
    best = f", best top-1 {run.best_top1:.2f}%" if run.best_top1 >= 0 else ""
    log0(ctx, f"resumed {saved.path}: {run.describe(pos)}{best}")


def open_logs(run: Run, flags: list[str], counts: dict[str, int], t_setup: float) -> None:
    """Rank 0: the log files (a resumed run keeps its table), the saved config, the run header and what comes next."""
    cfg, pos = run.cfg, run.position
    paths = RunPaths(cfg.output_dir, cfg.run_name)
    header = run_header(run, flags, counts)
    resumed = pos is not START
    run.runlog = RunLog(
        paths, header, RunLog.read_records(paths) if resumed else [], purge_step=pos.step if resumed else None
    )
    run.runlog.write_config(dump_yaml(cfg))
    last = run.last_record
    if last and last["epoch"] not in {r["epoch"] for r in run.runlog.records}:
        # killed between its checkpoint and its log line: the record travelled in the checkpoint
        run.runlog.epoch(last, run.schedule.lr_at, run.schedule.total_steps, run.steps_per_epoch, last["step"])
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    for tmp in ckpt.remove_unfinished(run.ckpt_dir):
        print(f"removed {tmp}, the temporary file of a checkpoint write that was interrupted", flush=True)
    (run.ckpt_dir / CONFIG).write_text(dump_yaml(cfg))
    for line in header:
        print(line.replace("- ", "", 1), flush=True)
    if pos.epoch >= cfg.epochs and pos.validate_first is None:
        todo = f"nothing to train: the run already finished its {cfg.epochs} epochs (raise --epochs to go on)"
    elif pos.phase == "mid_epoch":
        todo = f"continuing epoch {pos.epoch} at step {pos.batch // cfg.grad_accum}, then epochs up to {cfg.epochs - 1}"
    else:
        todo = f"training epochs {pos.epoch}..{cfg.epochs - 1}"
    print(f"setup took {time.perf_counter() - t_setup:.1f} s; {todo}", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def run_header(run: Run, flags: list[str], counts: dict[str, int]) -> list[str]:
    """The lines above the Markdown table (also printed at start): what ran, where, on what, with which recipe."""
    cfg, ctx, tl, vl = run.cfg, run.ctx, run.train_loader, run.val_loader
    global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum
    processes = f" ({ctx.world_size} processes)" if ctx.distributed else ""
    return [
        f"- command: `rn50 train {' '.join(flags)}`{processes}",
        f"- hardware: {ctx.world_size} x {device_name(ctx.device)}; torch {torch.__version__}",
        f"- data: {cfg.data_dir} ({tl.backend} loader), {tl.num_samples} train / {vl.num_samples} val images, "
        f"{tl.num_classes} classes",
        f"- model: {cfg.arch}{' + BlurPool' if cfg.blurpool else ''}, {run.precision.name}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}; step {run.parts.step_mode} ({run.parts.step_why}), "
        f"SGD {sgd_kernels(run.parts.optimizer)}",
        f"- batch: {cfg.batch_size} per GPU x {ctx.world_size} x {cfg.grad_accum} accumulation = {global_batch}; "
        f"{run.steps_per_epoch} steps per epoch",
        f"- LR: {cfg.lr_schedule}, max {run.schedule.max_lr:.4g}; weight decay {cfg.weight_decay:g} on "
        f"{counts['decay_tensors']} tensors, none on {counts['no_decay_tensors']} (BatchNorm, biases); "
        f"label smoothing {cfg.label_smoothing:g}",
        "- data wait %: share of the epoch spent blocked on the loader (time in next())",
    ]
