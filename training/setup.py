"""Everything before a run's first step: `setup(cfg, ...)` takes the run folder's lock, reads the checkpoint to
resume, builds the loaders, model, optimizer and schedule (training.components), restores the checkpoint into the Run
(training.run) and opens its logs. What only rank 0 does but every rank must stop on goes through
training.distributed.on_rank0.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from dataset_tools.locks import FolderBusy, folder_lock
from pipeline import Loader
from pipeline.contract import TooFewSamples
from training import checkpoint as ckpt
from training.checkpoint import START, Checkpoint
from training.components import batch_transform, make_loader, make_parts, seed_everything
from training.config import TrainConfig, dump_yaml
from training.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_max_cpu,
    broadcast_object,
    cpu_group,
    on_rank0,
)
from training.engine import resolve_precision
from training.layout import CONFIG, RunPaths
from training.logs import RunLog
from training.model import sgd_kernels
from training.run import Run, SetupError, log0, run_resolution
from training.schedules import build_schedule
from training.signals import StepControl, StopSignals


def setup(cfg: TrainConfig, ctx: DistContext, signals: StopSignals, flags: list[str]) -> Run:
    """Everything before the first step: seeds, the run folder's lock, the checkpoint to resume, loaders, model,
    logs, the run header. `flags`: the command line, for the header."""
    t_setup = time.perf_counter()
    seed_everything(cfg.seed, ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # fixed shapes per resolution: pick the fastest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.run_name:  # made from rank 0's clock, before anything is written under it
        cfg = replace(cfg, run_name=broadcast_object(f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}", ctx))
    precision = resolve_precision(cfg.precision, ctx.device)
    group = cpu_group(ctx)  # a collective: every rank makes it here, in the same order
    paths = RunPaths(cfg.output_dir, cfg.run_name)
    lock = lock_run(paths, ctx)
    with contextlib.ExitStack() as on_failure:
        on_failure.push(lock)  # released if the set-up fails; from then on the Run holds it
        resumed = load_resume_state(cfg, paths.latest, ctx, group) if cfg.resume != "no" else None
        position = resumed.position if resumed else START
        dtype = precision.input_dtype
        try:
            train_loader = make_loader(cfg, "train", ctx, dtype, resolution=run_resolution(cfg, position.epoch))
            val_loader = make_loader(cfg, "val", ctx, dtype, resolution=cfg.val_res)
        except TooFewSamples as e:
            gpus = f" on {e.world_size} processes" if e.world_size > 1 else ""
            raise SetupError(
                f"{cfg.data_dir}: {e}; lower --batch-size{' (or use fewer processes)' if e.world_size > 1 else ''}"
                if e.split == "train"
                else f"{cfg.data_dir}: {e}{gpus}; the {e.split} split needs at least one sample per process"
            ) from None
        steps_per_epoch = check_loaders(cfg, ctx, train_loader, val_loader)
        schedule = build_schedule(cfg, steps_per_epoch, ctx.world_size)
        parts, eval_model, counts = make_parts(cfg, train_loader.num_classes, ctx, precision, schedule)
        agree = partial(all_reduce_max_cpu, ctx=ctx, group=group)
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
            control=StepControl(signals, cfg.checkpoint_every, cfg.checkpoint_minutes, ctx.is_main, agree),
            ckpt_dir=paths.checkpoints,
            position=position,
            last_saved=position,
            lock=lock,
        )
        if resumed is not None:
            run.restore(resumed)
            del resumed  # the model and optimizer hold copies now; free the host memory
        on_rank0(ctx, lambda: open_logs(run, flags, counts, t_setup), partial(logs_failure, cfg), SetupError)
        on_failure.pop_all()
    return run


def logs_failure(cfg: TrainConfig, e: Exception) -> str | None:
    if not isinstance(e, OSError):
        return None
    return (
        f"{e.filename or cfg.output_dir}: cannot write the run's files there ({e.strerror or e}); choose another "
        "--output-dir or free space there"
    )


def lock_run(paths: RunPaths, ctx: DistContext) -> contextlib.ExitStack:
    """One process writes a run: rank 0 holds the lock of its checkpoint folder (dataset_tools.locks, released by
    the kernel however the process ends) for the whole run; a second run with the same --run-name and --output-dir
    stops here, on every rank, with one line naming the first one's pid. Nothing of the first run is touched."""
    lock = contextlib.ExitStack()
    hint = "wait for that run to end, or choose another --run-name (or --output-dir)"

    def busy(e: Exception) -> str | None:
        if isinstance(e, FolderBusy):
            return str(e)
        if isinstance(e, OSError):
            return f"{paths.checkpoints}: cannot be created ({e.strerror or e}); choose another --output-dir"
        return None

    on_rank0(ctx, lambda: lock.enter_context(folder_lock(paths.checkpoints, "rn50 train", hint=hint)), busy, SetupError)
    return lock


def check_loaders(cfg: TrainConfig, ctx: DistContext, train: Loader, val: Loader) -> int:
    """The loaders fit together and the config: returns the optimizer steps per epoch."""
    if train.classes != val.classes:
        raise SetupError(f"train and val class lists differ in {cfg.data_dir}")
    if cfg.num_classes and cfg.num_classes != train.num_classes:
        raise SetupError(f"{cfg.data_dir} has {train.num_classes} classes, --num-classes says {cfg.num_classes}")
    if train.num_classes == 1:
        log0(
            ctx,
            f"warning: {cfg.data_dir} holds one class ({train.classes[0]}): every prediction is right, so the loss "
            "goes to 0 and top-1 to 100% whatever the model learns; is --data-dir the dataset you meant?",
        )
    steps_per_epoch = len(train) // cfg.grad_accum
    if steps_per_epoch < 1:
        raise SetupError(
            f"{len(train)} batches per rank cannot make one step of --grad-accum "
            f"{cfg.grad_accum}; lower --batch-size or --grad-accum"
        )
    if cfg.deterministic and train.backend == "dali" and ctx.device.type == "cuda":
        log0(
            ctx,
            "--deterministic with DALI on the GPU: order, position and crops resume exactly (they are the "
            "loader's, not DALI's); bit-identical weights are not promised on a GPU (see README)",
        )
    return steps_per_epoch


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
