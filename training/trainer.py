"""The training run: set up (distributed context, loaders, model, optimizer, resume), then epochs of
train -> validate -> checkpoint -> log. `train(cfg)` is what `rn50 train` and `torchrun -m training` call once the
config has passed the cheap checks in training.train.

Resume is exact at any optimizer step: the loader position, the epoch's running sums and the whole training state go
into mid-epoch checkpoints (training.resume describes the phases); everything random in a step is a pure function of
(seed, epoch, sample or batch index, rank), so nothing drawn before the kill needs replaying. SIGTERM/SIGINT save at
the next step boundary and exit with 128 + the signal number (training.signals).
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import checkpoint as ckpt
from training import resume
from training.config import TrainConfig, dump_yaml, to_dict
from training.distributed import (
    DistContext,
    all_gather_object,
    all_reduce_max_cpu,
    barrier,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    cpu_group,
    init_distributed,
)
from training.ema import ModelEMA
from training.engine import (
    EpochStats,
    NonFiniteLoss,
    TrainParts,
    evaluate,
    make_scaler,
    resolve_precision,
    train_one_epoch,
)
from training.logs import RunLog
from training.model import build_model, build_optimizer
from training.schedules import build_schedule, train_resolution
from training.signals import StopSignals, exit_code, signal_name


def log0(ctx: DistContext, msg: str) -> None:
    if ctx.is_main:
        print(msg, flush=True)


def seed_everything(seed: int, rank: int) -> None:
    """Model init uses the same seed on every rank (DDP broadcasts rank 0's weights anyway); the other RNGs are
    offset by rank so nothing random is accidentally identical across ranks."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def weight_fingerprint(model: nn.Module) -> float:
    """A scalar that differs when two copies of the model's parameters differ (for the DDP in-sync check)."""
    with torch.no_grad():
        total = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        for i, p in enumerate(model.parameters()):
            total += (i + 1) * p.double().sum() + p.double().square().sum()
    return float(total)


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The batch augmentations' seed for one micro-batch: a pure function of (seed, epoch, batch index, rank), so a
    run resumed at any step draws the same mixup/cutmix/erasing/TrivialAugment decisions as the uninterrupted one,
    with no generator state to save. Different ranks draw differently (their batches differ too)."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, batch, rank, 0xA0C]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def build_batch_transform(cfg: TrainConfig, num_classes: int, rank: int):
    """The transform applying, in torchvision's order, the per-sample policy, random erasing, then mixup or cutmix
    (soft targets) from pipeline.augment, or None when all are off. Its generator is a CPU one (pipeline.augment
    draws its few numbers per sample on the CPU, so no device sync), reseeded for every micro-batch by batch_seed."""
    if not (cfg.mixup or cfg.cutmix or cfg.random_erase or cfg.auto_augment != "none"):
        return None
    from pipeline import augment

    gen = torch.Generator()

    def transform(images: torch.Tensor, labels: torch.Tensor, epoch: int,
                  batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen.manual_seed(batch_seed(cfg.seed, epoch, batch, rank))
        if cfg.auto_augment == "trivialaugment":
            images = augment.trivial_augment(images, generator=gen)
        elif cfg.auto_augment == "autoaugment":
            images = augment.auto_augment(images, generator=gen)
        if cfg.random_erase > 0:
            images = augment.random_erasing(images, p=cfg.random_erase, generator=gen)
        if cfg.mixup > 0 or cfg.cutmix > 0:
            use_cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or float(torch.rand((), generator=gen)) < cfg.mix_switch_prob)
            if use_cutmix:
                images, labels = augment.cutmix(images, labels, alpha=cfg.cutmix, num_classes=num_classes,
                                                p=cfg.mix_prob, generator=gen)
            else:
                images, labels = augment.mixup(images, labels, alpha=cfg.mixup, num_classes=num_classes,
                                               p=cfg.mix_prob, generator=gen)
        return images, labels

    return transform


class SetupError(RuntimeError):
    """The run cannot start as configured; the message says why and what to change."""


class Interrupted(Exception):
    """A stop signal was honoured: the checkpoint is written (or was already current); `where` says what it holds."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(where)
        self.signum, self.where = signum, where


def wrap_model(raw_model: nn.Module, compile_model: bool, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """(model to train, model to evaluate): torch.compile if asked, then DDP when distributed. Evaluation uses the
    compiled module without the DDP wrapper (no gradient hooks, no buffer broadcasts)."""
    model = torch.compile(raw_model) if compile_model else raw_model
    eval_model = model
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model, eval_model


def make_deterministic(device: torch.device) -> tuple[bool, bool]:
    """--deterministic: deterministic kernels everywhere; returns the previous (enabled, warn_only) to restore.

    On CUDA, cuBLAS needs a fixed workspace (CUBLAS_WORKSPACE_CONFIG, read when its handle is created, i.e. before
    the first matmul) and cuDNN must not autotune: cudnn.benchmark times kernels in each process and may pick other
    ones after a restart, which alone made a resumed bf16 run end with different weights on an H100 (torch 2.11),
    while with this flag the same check ended bit-identical (bf16 and fp16; tests/_resume_gpu_check.py). torch lists
    kernels ResNet needs as nondeterministic on CUDA (adaptive average pooling's backward), so there it only warns:
    on a GPU, bit-identity is measured on one device, not promised (other GPUs, NCCL's reduction order under DDP);
    position and state resume exactly either way."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return previous


def load_resume_state(cfg: TrainConfig, path: Path, ctx: DistContext, group=None) -> dict | None:
    """The checkpoint to continue from, or None to start (--resume auto without a checkpoint). Every rank reads the
    file itself; they must all see the same one (shared storage for multi-node runs), which is checked."""
    state, error = None, ""
    if cfg.resume == "yes" or (cfg.resume == "auto" and path.is_file()):
        try:
            state = ckpt.load_checkpoint(path, map_location="cpu")
        except (FileNotFoundError, ValueError) as e:
            previous = ckpt.epoch_files(path.parent)
            hint = (f"; the newest per-epoch file is {previous[-1].name}: copy it over {path.name} to resume from "
                    "there, or start a new --run-name" if previous else "; start a new --run-name, or delete "
                    f"{path.parent} to start this run over")
            error = f"{e}{hint}"
    seen = all_gather_object((bool(error), state is not None, state and int(state.get("step", -1)),
                              state and state.get("phase")), ctx, group)
    if error:
        raise SetupError(error)
    if any(s[0] for s in seen):
        raise SetupError(f"another rank could not read {path} (see its message); every rank must see the same file")
    if len({s[1:] for s in seen}) > 1:
        raise SetupError(f"ranks see different checkpoints at {path} ({seen}); put --output-dir on storage every "
                         "node shares (EFS, FSx, NFS)")
    return state


def restore(state: dict, parts: TrainParts, cfg: TrainConfig, ctx: DistContext) -> float:
    """Load a checkpoint that check_compatible accepted into the training parts (model, optimizer, scaler, EMA, this
    rank's RNGs); returns the best top-1 so far. Warns where the resumed run differs from the saved one."""
    parts.raw_model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None:
        if state.get("ema") is None:
            log0(ctx, "warning: the checkpoint has no EMA; starting one from the current weights")
            parts.ema = ModelEMA(parts.raw_model, cfg.ema_decay)
        else:
            parts.ema.load_state_dict(state["ema"])
    saved, schedule = state["scheduler"], parts.schedule
    if saved["total_steps"] != schedule.total_steps or saved["max_lr"] != schedule.max_lr:
        log0(ctx, f"warning: the LR schedule changed on resume (total steps {saved['total_steps']} -> "
                  f"{schedule.total_steps}, max LR {saved['max_lr']:.4g} -> {schedule.max_lr:.4g})")
    rngs = state.get("rng") or []
    if len(rngs) == ctx.world_size:
        ckpt.set_rng_state(rngs[ctx.rank])
    else:
        log0(ctx, f"warning: RNG states saved by {len(rngs)} ranks, running {ctx.world_size}; reseeding")
    threads = (state.get("deterministic") or {}).get("threads")
    if cfg.deterministic and threads and threads != torch.get_num_threads():
        log0(ctx, f"--deterministic: {threads} CPU threads as in the saved run (not {torch.get_num_threads()})")
        torch.set_num_threads(threads)
    return float(state.get("best_top1", -1.0))


def train(cfg: TrainConfig, argv: list[str] | None = None) -> int:
    ctx = init_distributed(cfg.device)
    previous = make_deterministic(ctx.device) if cfg.deterministic else None
    try:
        with StopSignals() as signals:
            return _train(cfg, ctx, argv or sys.argv, signals)
    except SetupError as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 2
    except NonFiniteLoss as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 1
    except Interrupted as e:
        log0(ctx, f"rn50 train: {signal_name(e.signum)} received: stopped with the checkpoint at {e.where}; "
                  f"continue with --run-name {cfg.run_name} --output-dir {cfg.output_dir} --resume "
                  f"(exit code {exit_code(e.signum)})")
        return exit_code(e.signum)
    except KeyboardInterrupt:
        log0(ctx, "rn50 train: interrupted; the latest checkpoint is intact (--resume continues from it)")
        return 130
    finally:
        if previous is not None:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        cleanup()


class StepControl:
    """What happens at a step boundary: save a mid-epoch checkpoint (every N steps, every M minutes), stop (a
    signal). Under DDP the ranks agree through one all-reduce of two integers per step on a CPU (gloo) group: the
    signal may reach ranks at different steps, and the minutes are counted on rank 0's clock, yet all ranks must
    save and stop at the same step. The cost is one small host round trip per step, no GPU sync."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, group, signals: StopSignals) -> None:
        self.every, self.seconds = cfg.checkpoint_every, cfg.checkpoint_minutes * 60.0
        self.ctx, self.group, self.signals = ctx, group, signals
        self.last_save = time.monotonic()
        self.stop = 0  # the agreed signal number once a stop is decided

    @property
    def mid_epoch(self) -> bool:
        return self.every > 0 or self.seconds > 0

    def poll(self) -> tuple[int, bool]:
        """(signal number or 0, minutes due), the same on every rank."""
        due = self.ctx.is_main and self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds
        signum, due = all_reduce_max_cpu([self.signals.requested, int(due)], self.ctx, self.group)
        if signum:
            self.stop = signum
        return signum, bool(due)

    def stop_requested(self) -> bool:
        return bool(self.poll()[0])

    def saved(self) -> None:
        self.last_save = time.monotonic()


def _train(cfg: TrainConfig, ctx: DistContext, argv: list[str], signals: StopSignals) -> int:
    from pipeline import build_loader

    t_setup = time.perf_counter()
    seed_everything(cfg.seed, ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic  # fixed shapes per resolution: pick the fastest
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(cfg.precision, ctx.device)
    if not cfg.run_name:
        cfg.run_name = broadcast_object(f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}", ctx)
    run = cfg.run_name
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints" / run
    latest = ckpt_dir / ckpt.LATEST
    group = cpu_group(ctx)
    resume_state = load_resume_state(cfg, latest, ctx, group) if cfg.resume != "no" else None
    pos = resume.position_of(resume_state) if resume_state else resume.START

    # ---- data
    common = dict(backend=cfg.loader, workers=cfg.workers, device=ctx.device, dtype=precision.input_dtype,
                  rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed, verbose=ctx.is_main,
                  **cfg.loader_options())
    train_loader = build_loader(cfg.data_dir, split="train", batch_size=cfg.batch_size,
                                resolution=train_resolution(cfg, min(pos.epoch, cfg.epochs - 1)), drop_last=True,
                                **common)
    val_loader = build_loader(cfg.data_dir, split="val", batch_size=cfg.val_batch_size or cfg.batch_size,
                              resolution=cfg.val_res, drop_last=False, **common)
    num_classes = train_loader.num_classes
    if train_loader.classes != val_loader.classes:
        raise SetupError(f"train and val class lists differ in {cfg.data_dir}")
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise SetupError(f"{cfg.data_dir} has {num_classes} classes, --num-classes says {cfg.num_classes}")
    cfg.num_classes = num_classes
    accum = cfg.grad_accum
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch < 1:
        raise SetupError(f"{len(train_loader)} batches per rank cannot make one step of --grad-accum "
                         f"{accum}; lower --batch-size or --grad-accum")
    if cfg.deterministic and train_loader.backend == "dali" and ctx.device.type == "cuda":
        log0(ctx, "--deterministic with DALI on the GPU: order, position and DALI's own checkpointed random state "
                  "resume exactly; bit-identical weights are not promised on a GPU (see README)")

    # ---- model, optimizer, schedule, resume
    raw_model = build_model(cfg.arch, num_classes, cfg.zero_init_residual, cfg.blurpool,
                            cfg.channels_last).to(ctx.device)
    optimizer, counts = build_optimizer(raw_model, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    schedule = build_schedule(cfg, steps_per_epoch, ctx.world_size)
    parts = TrainParts(model=raw_model, raw_model=raw_model, optimizer=optimizer,
                       scaler=make_scaler(precision, ctx.device), schedule=schedule, precision=precision,
                       label_smoothing=cfg.label_smoothing, grad_accum=accum,
                       ema=ModelEMA(raw_model, cfg.ema_decay) if cfg.ema else None)
    best_top1 = -1.0
    if resume_state is not None:
        try:  # everything is checked before the first tensor is copied: a checkpoint loads whole or not at all
            resume.check_compatible(resume_state, latest, arch=cfg.arch, classes=train_loader.classes,
                                    data_dir=cfg.data_dir, model=raw_model, optimizer=optimizer,
                                    ema_module=parts.ema.module if parts.ema else None)
            for warning in resume.check_position(resume_state, latest, world_size=ctx.world_size,
                                                 batch_size=cfg.batch_size, grad_accum=accum, seed=cfg.seed,
                                                 num_samples=train_loader.num_samples,
                                                 order=train_loader.order):
                log0(ctx, f"warning: {warning}")
        except resume.ResumeError as e:
            raise SetupError(str(e)) from None
        if pos.phase == "mid_epoch" and pos.batch % accum:
            raise SetupError(f"{latest}: loader batch {pos.batch} is not a multiple of --grad-accum {accum}")
        best_top1 = restore(resume_state, parts, cfg, ctx)
        if pos.phase == "mid_epoch":  # the loader continues inside an epoch: its own state, and what changed
            saved_loader = resume_state.get("loader") or {}
            loader_states = resume_state.get("loader_states") or []
            if len(loader_states) == ctx.world_size:
                train_loader.restore_position(pos.epoch, pos.batch, loader_states[ctx.rank])
            if saved_loader.get("backend", train_loader.backend) != train_loader.backend:
                log0(ctx, f"warning: epoch {pos.epoch} was started with the {saved_loader['backend']} loader and "
                          f"continues with {train_loader.backend}: the same samples, but their crops differ from "
                          "the interrupted run's")
            saved_res = saved_loader.get("resolution")
            if saved_res and saved_res != train_resolution(cfg, pos.epoch):
                log0(ctx, f"warning: epoch {pos.epoch} was training at {saved_res} px, this config says "
                          f"{train_resolution(cfg, pos.epoch)} px (progressive resizing flags changed?)")
        best = f", best top-1 {best_top1:.2f}%" if best_top1 >= 0 else ""
        log0(ctx, f"resumed {latest}: {pos.describe(steps_per_epoch, accum)}{best}")
    # The last logged epoch's record travels in every checkpoint: a kill between the checkpoint write and the log
    # write would otherwise lose that epoch's log line for good.
    last_record = resume_state.get("metrics") if resume_state else None
    del resume_state  # the optimizer and model hold copies now; free the host memory
    parts.model, eval_model = wrap_model(raw_model, cfg.compile, ctx)
    batch_transform = build_batch_transform(cfg, num_classes, ctx.rank)
    threads = torch.get_num_threads()

    # ---- logs (rank 0 only)
    runlog = None
    if ctx.is_main:
        header = run_header(cfg, ctx, argv, train_loader, val_loader, precision.name, steps_per_epoch,
                            schedule.max_lr, counts)
        resumed = pos is not resume.START
        runlog = RunLog(out, run, header, RunLog.read_records(out, run) if resumed else [],
                        purge_step=pos.step if resumed else None)
        runlog.write_config(dump_yaml(cfg))
        if last_record and last_record["epoch"] not in {r["epoch"] for r in runlog.records}:
            runlog.epoch(last_record, schedule.lr_at, schedule.total_steps, steps_per_epoch, last_record["step"])
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for tmp in ckpt.remove_unfinished(ckpt_dir):
            print(f"removed {tmp}, the temporary file of a checkpoint write that was interrupted", flush=True)
        (ckpt_dir / "config.yaml").write_text(dump_yaml(cfg))
        for line in header:
            print(line.replace("- ", "", 1), flush=True)
        if pos.epoch >= cfg.epochs and pos.validate_first is None:
            todo = f"nothing to train: the run already finished its {cfg.epochs} epochs (raise --epochs to go on)"
        elif pos.phase == "mid_epoch":
            todo = f"continuing epoch {pos.epoch} at step {pos.batch // accum}, then epochs up to {cfg.epochs - 1}"
        else:
            todo = f"training epochs {pos.epoch}..{cfg.epochs - 1}"
        print(f"setup took {time.perf_counter() - t_setup:.1f} s; {todo}", flush=True)

    control = StepControl(cfg, ctx, group, signals)
    ema = parts.ema

    def mid_epoch_at(epoch: int, steps_done: int) -> resume.Position:
        return resume.Position(epoch=epoch, batch=steps_done * accum, step=epoch * steps_per_epoch + steps_done,
                               phase="mid_epoch")

    def after_training(epoch: int, phase: str) -> resume.Position:
        """Epoch `epoch` trained: before its validation, or (end_of_epoch) validated and logged."""
        return resume.Position(epoch=epoch + 1, batch=0, step=(epoch + 1) * steps_per_epoch, phase=phase)

    def state_dict(at: resume.Position, **extra) -> dict | None:
        """The whole run's state at `at` (rank 0; None elsewhere). Every rank must call it: it gathers the RNG
        states."""
        gathered = all_gather_object((ckpt.rng_state(), train_loader.position_state()), ctx, group)
        if not ctx.is_main:
            return None
        return {
            "format": ckpt.FORMAT_VERSION, "run_name": run, "phase": at.phase, "model": raw_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(at.step),
            "scaler": parts.scaler.state_dict(), "ema": ema.state_dict() if ema else None, "epoch": at.epoch - 1,
            "next_epoch": at.epoch, "step": at.step,
            "loader": {"epoch": at.epoch, "batch": at.batch, "seed": cfg.seed,
                       "resolution": train_resolution(cfg, min(at.epoch, cfg.epochs - 1)),
                       "world_size": ctx.world_size, "batch_size": cfg.batch_size, "grad_accum": accum,
                       "num_samples": train_loader.num_samples, "backend": train_loader.backend,
                       "order": train_loader.order},
            "loader_states": [g[1] for g in gathered] if at.phase == "mid_epoch" else None,
            "rng": [g[0] for g in gathered], "config": to_dict(cfg), "classes": train_loader.classes,
            "best_top1": best_top1,
            "deterministic": {"threads": threads} if cfg.deterministic else None, "metrics": last_record, **extra,
        }

    def save_latest(at: resume.Position, **extra) -> None:
        state = state_dict(at, **extra)
        if state is not None:
            ckpt.save_latest(state, ckpt_dir)
        control.saved()

    def stop_here(at: resume.Position) -> typing.NoReturn:
        barrier(ctx, group)  # no rank exits while rank 0 is still writing
        raise Interrupted(control.stop, at.describe(steps_per_epoch, accum))

    def finish_epoch(epoch: int, stats: EpochStats, before_validation_saved: bool) -> None:
        """Validate a trained epoch, write its checkpoint files and log line."""
        nonlocal best_top1, last_record
        t_val = time.perf_counter()
        res = train_resolution(cfg, epoch)
        broadcast_buffers(raw_model, ctx)
        if ema is not None:
            broadcast_buffers(ema.module, ctx)
        before_validation = after_training(epoch, "before_validation")
        if (control.mid_epoch or control.stop) and not before_validation_saved:
            # a kill during validation then costs the validation only, not the epoch
            save_latest(before_validation, epoch_stats=stats.state_dict())
            before_validation_saved = True
            if control.stop:
                stop_here(before_validation)
        val = evaluate(eval_model, val_loader, precision, ctx, tta=cfg.tta, epoch=epoch,
                       should_stop=control.stop_requested)
        ema_val = None
        if val is not None and ema is not None:
            ema_val = evaluate(ema.module, val_loader, precision, ctx, tta=cfg.tta, epoch=epoch,
                               should_stop=control.stop_requested)
        if val is None or (ema is not None and ema_val is None):
            if not before_validation_saved:
                save_latest(before_validation, epoch_stats=stats.state_dict())
            stop_here(before_validation)
        end = after_training(epoch, "end_of_epoch")
        step = end.step
        record = {
            "epoch": epoch, "train_loss": stats.loss, "train_top1": stats.top1, "val_loss": val["loss"],
            "val_top1": val["top1"], "val_top5": val["top5"], "ema_top1": ema_val["top1"] if ema_val else None,
            "lr": stats.lr, "res": res, "val_res": cfg.val_res,
            "epoch_time_s": stats.seconds + time.perf_counter() - t_val, "train_time_s": stats.seconds,
            "images_per_s": stats.images_per_s, "data_wait_pct": stats.data_wait_pct, "step": step,
            "val_samples": val["samples"],
        }
        is_best = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        fingerprints = all_gather_object(weight_fingerprint(raw_model), ctx, group)
        if len(set(fingerprints)) > 1:
            log0(ctx, f"warning: ranks hold different weights after epoch {epoch}: {fingerprints}")
        last_record = record
        state = state_dict(end, rank_weight_fingerprints=fingerprints)
        if state is not None and runlog is not None:
            ckpt.save_checkpoint(state, ckpt_dir, epoch, is_best, cfg.keep_last)
            runlog.epoch(record, schedule.lr_at, schedule.total_steps, steps_per_epoch, step)
            ema_txt = f", EMA top-1 {ema_val['top1']:.2f}" if ema_val else ""
            print(f"epoch {epoch}: train loss {stats.loss:.4f}, val loss {val['loss']:.4f}, top-1 {val['top1']:.2f}%, "
                  f"top-5 {val['top5']:.2f}%{ema_txt}, {res} px, {record['epoch_time_s']:.1f} s, "
                  f"{stats.images_per_s:.0f} img/s, data wait {stats.data_wait_pct:.0f}%", flush=True)
        control.saved()

    def stops_after(epoch: int) -> bool:
        if epoch != cfg.stop_after_epoch:
            return False
        log0(ctx, f"stopping after epoch {epoch} as asked; continue with --run-name {run} --resume")
        return True

    # ---- epochs
    try:  # a stop or an error still flushes the TensorBoard events written so far
        first_epoch = pos.epoch
        if pos.validate_first is not None:
            finish_epoch(pos.validate_first, pos.pending, before_validation_saved=True)
            if stops_after(pos.validate_first):
                first_epoch = cfg.epochs
        for epoch in range(first_epoch, cfg.epochs):
            if control.stop_requested():  # arrived between epochs: the latest checkpoint already holds everything
                stop_here(resume.Position(epoch=epoch, batch=0, step=epoch * steps_per_epoch))
            resumed_here = pos.phase == "mid_epoch" and epoch == pos.epoch
            start_batch = pos.batch if resumed_here else 0
            train_loader.set_resolution(train_resolution(cfg, epoch))
            train_loader.set_epoch(epoch, start_batch)

            def boundary(steps_done: int, snapshot, epoch: int = epoch) -> bool:
                signum, due = control.poll()
                if steps_done == steps_per_epoch:
                    return bool(signum)  # the epoch's end writes (before validation) what a save here would
                if signum or due or (control.every and steps_done % control.every == 0):
                    at = mid_epoch_at(epoch, steps_done)
                    save_latest(at, epoch_progress=snapshot().state_dict())
                    if signum:
                        stop_here(at)
                return False

            stats = train_one_epoch(parts, train_loader, epoch, steps_per_epoch, ctx, start_batch=start_batch,
                                    batch_transform=batch_transform, log_every=cfg.log_every,
                                    on_log=runlog.step if runlog else None, progress=cfg.progress,
                                    resumed=pos.progress if resumed_here else None, boundary=boundary)
            finish_epoch(epoch, stats, before_validation_saved=False)
            if stops_after(epoch):
                break
    finally:
        if runlog is not None:
            runlog.close()
    if runlog is not None:
        print(f"logs: {runlog.dir}/training_log.md (+ .json, loss.png, accuracy.png, lr.png)\n"
              f"TensorBoard: tensorboard --logdir {out / 'runs'}\ncheckpoints: {ckpt_dir}", flush=True)
    return 0


def run_header(cfg: TrainConfig, ctx: DistContext, argv: list[str], train_loader, val_loader, precision: str,
               steps_per_epoch: int, max_lr: float, counts: dict[str, int]) -> list[str]:
    """The lines above the Markdown table (also printed at start): what ran, where, on what, with which recipe."""
    global_batch = cfg.batch_size * ctx.world_size * cfg.grad_accum
    return [
        f"- command: `{' '.join(argv)}`",
        f"- hardware: {ctx.world_size} x {device_name(ctx.device)}; torch {torch.__version__}",
        f"- data: {cfg.data_dir} ({train_loader.backend} loader), {train_loader.num_samples} train / "
        f"{val_loader.num_samples} val images, {train_loader.num_classes} classes",
        f"- model: {cfg.arch}{' + BlurPool' if cfg.blurpool else ''}, {precision}, "
        f"{'channels_last' if cfg.channels_last else 'NCHW'}{', compiled' if cfg.compile else ''}",
        f"- batch: {cfg.batch_size} per GPU x {ctx.world_size} x {cfg.grad_accum} accumulation = {global_batch}; "
        f"{steps_per_epoch} steps per epoch",
        f"- LR: {cfg.lr_schedule}, max {max_lr:.4g}; weight decay {cfg.weight_decay:g} on "
        f"{counts['decay_tensors']} tensors, none on {counts['no_decay_tensors']} (BatchNorm, biases); "
        f"label smoothing {cfg.label_smoothing:g}",
        "- data wait %: share of the epoch spent blocked on the loader (time in next())",
    ]
