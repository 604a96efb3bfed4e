"""The training run: set up (distributed context, loaders, model, optimizer, resume), then epochs of
train -> validate -> checkpoint -> log. `train(cfg)` is what `rn50 train` and `torchrun -m training` call once the
config has passed the cheap checks in training.train.
"""

from __future__ import annotations

import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import checkpoint as ckpt
from training.config import TrainConfig, dump_yaml, to_dict
from training.distributed import (
    DistContext,
    all_gather_object,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    init_distributed,
)
from training.ema import ModelEMA
from training.engine import NonFiniteLoss, TrainParts, evaluate, make_scaler, resolve_precision, train_one_epoch
from training.logs import RunLog
from training.model import build_model, build_optimizer
from training.schedules import build_schedule, train_resolution


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


def build_batch_transform(cfg: TrainConfig, num_classes: int):
    """(transform, generator) applying, in torchvision's order, the per-sample policy, random erasing, then
    mixup or cutmix (soft targets) from pipeline.augment; (None, None) when all are off. The generator is a CPU
    one (pipeline.augment draws its few numbers per sample on the CPU, so no device sync); the trainer reseeds it
    every epoch from (seed, epoch, rank)."""
    if not (cfg.mixup or cfg.cutmix or cfg.random_erase or cfg.auto_augment != "none"):
        return None, None
    from pipeline import augment

    gen = torch.Generator()

    def transform(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cfg.auto_augment == "trivialaugment":
            images = augment.trivial_augment(images, generator=gen)
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

    return transform, gen


class SetupError(RuntimeError):
    """The run cannot start as configured; the message says why and what to change."""


def wrap_model(raw_model: nn.Module, compile_model: bool, ctx: DistContext) -> tuple[nn.Module, nn.Module]:
    """(model to train, model to evaluate): torch.compile if asked, then DDP when distributed. Evaluation uses the
    compiled module without the DDP wrapper (no gradient hooks, no buffer broadcasts)."""
    model = torch.compile(raw_model) if compile_model else raw_model
    eval_model = model
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model, eval_model


def restore(state: dict, parts: TrainParts, cfg: TrainConfig, classes: list[str], ctx: DistContext) -> tuple[int, float]:
    """Load a checkpoint into the training parts (model, optimizer, scaler, EMA, this rank's RNGs); returns
    (global step, best top-1). Warns where the resumed run differs from the saved one."""
    if state.get("classes") and state["classes"] != classes:
        raise SetupError(f"{cfg.data_dir} does not have the classes run {cfg.run_name!r} was trained on; resume "
                         "with the same --data-dir")
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
    return int(state["step"]), float(state.get("best_top1", -1.0))


def train(cfg: TrainConfig, argv: list[str] | None = None) -> int:
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, argv or sys.argv)
    except SetupError as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 2
    except NonFiniteLoss as e:
        log0(ctx, f"rn50 train: error: {e}")
        return 1
    except KeyboardInterrupt:
        log0(ctx, "rn50 train: interrupted; checkpoints of finished epochs are intact (--resume continues)")
        return 130
    finally:
        cleanup()


def _train(cfg: TrainConfig, ctx: DistContext, argv: list[str]) -> int:
    from pipeline import build_loader

    t_setup = time.perf_counter()
    seed_everything(cfg.seed, ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes per resolution: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = resolve_precision(cfg.precision, ctx.device)
    if not cfg.run_name:
        cfg.run_name = broadcast_object(f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}", ctx)
    run = cfg.run_name
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints" / run
    resume_state = ckpt.load_checkpoint(ckpt_dir / ckpt.LATEST, map_location=ctx.device) if cfg.resume else None
    start_epoch = int(resume_state["next_epoch"]) if resume_state else 0

    # ---- data
    common = dict(backend=cfg.loader, workers=cfg.workers, device=ctx.device, dtype=precision.input_dtype,
                  rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed, verbose=ctx.is_main)
    train_loader = build_loader(cfg.data_dir, split="train", batch_size=cfg.batch_size,
                                resolution=train_resolution(cfg, start_epoch), drop_last=True, **common)
    val_loader = build_loader(cfg.data_dir, split="val", batch_size=cfg.val_batch_size or cfg.batch_size,
                              resolution=cfg.val_res, drop_last=False, **common)
    num_classes = train_loader.num_classes
    if train_loader.classes != val_loader.classes:
        raise SetupError(f"train and val class lists differ in {cfg.data_dir}")
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise SetupError(f"{cfg.data_dir} has {num_classes} classes, --num-classes says {cfg.num_classes}")
    cfg.num_classes = num_classes
    steps_per_epoch = len(train_loader) // cfg.grad_accum
    if steps_per_epoch < 1:
        raise SetupError(f"{len(train_loader)} batches per rank cannot make one step of --grad-accum "
                         f"{cfg.grad_accum}; lower --batch-size or --grad-accum")

    # ---- model, optimizer, schedule, resume
    raw_model = build_model(cfg.arch, num_classes, cfg.zero_init_residual, cfg.blurpool,
                            cfg.channels_last).to(ctx.device)
    optimizer, counts = build_optimizer(raw_model, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    schedule = build_schedule(cfg, steps_per_epoch, ctx.world_size)
    parts = TrainParts(model=raw_model, raw_model=raw_model, optimizer=optimizer,
                       scaler=make_scaler(precision, ctx.device), schedule=schedule, precision=precision,
                       label_smoothing=cfg.label_smoothing, grad_accum=cfg.grad_accum,
                       ema=ModelEMA(raw_model, cfg.ema_decay) if cfg.ema else None)
    step, best_top1 = 0, -1.0
    if resume_state is not None:
        step, best_top1 = restore(resume_state, parts, cfg, train_loader.classes, ctx)
        log0(ctx, f"resumed {ckpt_dir / ckpt.LATEST}: epoch {start_epoch}, step {step}, best top-1 {best_top1:.2f}")
    parts.model, eval_model = wrap_model(raw_model, cfg.compile, ctx)
    ema = parts.ema
    batch_transform, aug_generator = build_batch_transform(cfg, num_classes)

    # ---- logs (rank 0 only)
    runlog = None
    if ctx.is_main:
        header = run_header(cfg, ctx, argv, train_loader, val_loader, precision.name, steps_per_epoch,
                            schedule.max_lr, counts)
        runlog = RunLog(out, run, header, RunLog.read_records(out, run) if resume_state else [])
        runlog.write_config(dump_yaml(cfg))
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "config.yaml").write_text(dump_yaml(cfg))
        for line in header:
            print(line.replace("- ", "", 1), flush=True)
        todo = f"training epochs {start_epoch}..{cfg.epochs - 1}" if start_epoch < cfg.epochs else \
            f"nothing to train: the run already finished its {cfg.epochs} epochs (raise --epochs to go on)"
        print(f"setup took {time.perf_counter() - t_setup:.1f} s; {todo}", flush=True)

    # ---- epochs
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        res = train_resolution(cfg, epoch)
        train_loader.set_resolution(res)
        train_loader.set_epoch(epoch, 0)
        if aug_generator is not None:
            aug_generator.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, ctx.rank]).generate_state(1)[0]))
        stats = train_one_epoch(parts, train_loader, epoch, steps_per_epoch, ctx, batch_transform=batch_transform,
                                log_every=cfg.log_every, on_log=runlog.step if runlog else None,
                                progress=cfg.progress)
        step = (epoch + 1) * steps_per_epoch
        broadcast_buffers(raw_model, ctx)
        if ema is not None:
            broadcast_buffers(ema.module, ctx)
        val = evaluate(eval_model, val_loader, precision, ctx, tta=cfg.tta, epoch=epoch)
        ema_val = evaluate(ema.module, val_loader, precision, ctx, tta=cfg.tta, epoch=epoch) if ema else None
        record = {
            "epoch": epoch, "train_loss": stats.loss, "train_top1": stats.top1, "val_loss": val["loss"],
            "val_top1": val["top1"], "val_top5": val["top5"], "ema_top1": ema_val["top1"] if ema_val else None,
            "lr": stats.lr, "res": res, "val_res": cfg.val_res, "epoch_time_s": time.perf_counter() - t_epoch,
            "train_time_s": stats.seconds, "images_per_s": stats.images_per_s, "data_wait_pct": stats.data_wait_pct,
            "step": step, "val_samples": val["samples"],
        }
        is_best = val["top1"] > best_top1
        best_top1 = max(best_top1, val["top1"])
        # every rank takes part in the gathers; only rank 0 writes
        rngs = all_gather_object(ckpt.rng_state(), ctx)
        fingerprints = all_gather_object(weight_fingerprint(raw_model), ctx)
        if len(set(fingerprints)) > 1:
            log0(ctx, f"warning: ranks hold different weights after epoch {epoch}: {fingerprints}")
        if runlog is not None:
            state = {
                "format": ckpt.FORMAT_VERSION, "run_name": run, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(step),
                "scaler": parts.scaler.state_dict(), "ema": ema.state_dict() if ema else None, "epoch": epoch,
                "next_epoch": epoch + 1, "step": step,
                "loader": {"epoch": epoch + 1, "batch": 0, "seed": cfg.seed,
                           "resolution": train_resolution(cfg, min(epoch + 1, cfg.epochs - 1))},
                "rng": rngs, "rank_weight_fingerprints": fingerprints, "config": to_dict(cfg),
                "classes": train_loader.classes, "best_top1": best_top1, "metrics": record,
            }
            ckpt.save_checkpoint(state, ckpt_dir, epoch, is_best, cfg.keep_last)
            runlog.epoch(record, schedule.lr_at, schedule.total_steps, steps_per_epoch, step)
            ema_txt = f", EMA top-1 {ema_val['top1']:.2f}" if ema_val else ""
            print(f"epoch {epoch}: train loss {stats.loss:.4f}, val loss {val['loss']:.4f}, top-1 {val['top1']:.2f}%, "
                  f"top-5 {val['top5']:.2f}%{ema_txt}, {res} px, {record['epoch_time_s']:.1f} s, "
                  f"{stats.images_per_s:.0f} img/s, data wait {stats.data_wait_pct:.0f}%", flush=True)
        if epoch == cfg.stop_after_epoch:
            log0(ctx, f"stopping after epoch {epoch} as asked; continue with --run-name {run} --resume")
            break
    if runlog is not None:
        runlog.close()
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
