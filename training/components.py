"""What a run is made of, built from the config in one place: loaders, the model with its optimizer and step parts,
and the batch augmentation recipe. The trainer, `rn50 lr-find`, `rn50 show-batch`, `rn50 eval` and `rn50 bench step`
all build them here, so what they train, sweep, show and time is the same thing.
"""

from __future__ import annotations

import random
from functools import partial

import numpy as np
import torch
from torch import nn

from pipeline import Crops, DALIOptions, FFCVOptions, Loader, LoaderOptions, Placement, Recipe, build_loader
from training.config import TrainConfig
from training.distributed import DistContext
from training.ema import ModelEMA
from training.engine import BatchTransform, Precision, TrainParts, make_scaler, resolve_step
from training.model import build_model, build_optimizer


def seed_everything(seed: int, rank: int) -> None:
    """Model init uses the same seed on every rank (DDP broadcasts rank 0's weights anyway); the other RNGs are
    offset by rank so nothing random is accidentally identical across ranks."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def make_loader(
    cfg: TrainConfig,
    split: str,
    ctx: DistContext,
    dtype: torch.dtype,
    resolution: int,
    batch_size: int | None = None,
    val_crop_ratio: float | None = None,
) -> Loader:
    """The config's loader for `split`: train batches of --batch-size with drop_last (every step a full batch), val
    batches of --val-batch-size (default --batch-size) without it (every image counted once). val_crop_ratio: the
    centre crop's side / shorter side (None: the loaders' 224/256; `rn50 eval --crop-ratio`)."""
    train = split == "train"
    return build_loader(
        cfg.data_dir,
        split,
        batch_size=batch_size or (cfg.batch_size if train else cfg.val_batch_size or cfg.batch_size),
        resolution=resolution,
        placement=Placement(ctx.device, dtype, ctx.rank, ctx.world_size),
        options=loader_options(cfg, val_crop_ratio),
        seed=cfg.seed,
        drop_last=train,
        verbose=ctx.is_main,
    )


def loader_options(cfg: TrainConfig, val_crop_ratio: float | None = None) -> LoaderOptions:
    """The config's loader flags as build_loader's options; the trainer never picks DALI's source (it reads the
    beton when there is one). DALI's -1 and 0 stand for the GPU kind's defaults (pipeline.dali_tuning)."""
    return LoaderOptions(
        backend=cfg.loader,
        workers=cfg.workers,
        crops=Crops() if val_crop_ratio is None else Crops(val_crop_ratio=val_crop_ratio),
        ffcv=FFCVOptions(os_cache=cfg.os_cache, order=cfg.loader_order),
        dali=DALIOptions(
            hw_decoder_load=cfg.hw_decoder_load,
            threads=cfg.dali_threads,
            prefetch=cfg.dali_prefetch,
            nvjpeg_padding_mb=cfg.nvjpeg_padding_mb,
            feed_thread=cfg.dali_feed_thread,
        ),
        skip_listed_in=cfg.skip_listed_in or None,
    )


def make_recipe(cfg: TrainConfig, num_classes: int) -> Recipe:
    """The batch augmentation of the config (pipeline.augment.recipe): --auto-augment, --random-erase, --mixup,
    --cutmix, --mix-prob, --mix-switch-prob, seeded by --seed."""
    return Recipe(
        num_classes,
        seed=cfg.seed,
        policy=cfg.auto_augment,
        random_erase=cfg.random_erase,
        mixup=cfg.mixup,
        cutmix=cfg.cutmix,
        mix_prob=cfg.mix_prob,
        mix_switch_prob=cfg.mix_switch_prob,
    )


def batch_transform(cfg: TrainConfig, num_classes: int, rank: int) -> BatchTransform | None:
    """The recipe as the training loop calls it, for this rank; None when no augmentation is on."""
    recipe = make_recipe(cfg, num_classes)
    return partial(recipe, rank=rank) if recipe.active else None


# torch.compile recompiles for every new input shape; a run sees one per training resolution and one for validation
# (whose last batch is padded to full size), so this many cached graphs cover any progressive-resizing schedule.
RECOMPILE_LIMIT = 16


def compile_model(module: nn.Module, mode: str | None = None) -> nn.Module:
    """torch.compile with static shapes: one compilation per resolution (dynamic=False: no shape-generic graph that
    automatic dynamic shapes would compile on the second resolution, slower than the static ones). mode: torch's
    (None = default; "reduce-overhead", "max-autotune" are `rn50 bench step` levers)."""
    import torch._dynamo.config as dynamo

    dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
    dynamo.cache_size_limit = max(dynamo.cache_size_limit, RECOMPILE_LIMIT)
    return torch.compile(module, dynamic=False, mode=mode)


def wrap_model(
    raw_model: nn.Module, compiled: bool, ctx: DistContext, compile_mode: str | None = None
) -> tuple[nn.Module, nn.Module]:
    """(model to train, model to evaluate): torch.compile if asked, then DDP when distributed. Evaluation uses the
    compiled module without the DDP wrapper (no gradient hooks, no buffer broadcasts)."""
    model = compile_model(raw_model, compile_mode) if compiled else raw_model
    eval_model = model
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    return model, eval_model


def sgd_impl(requested: str, device: torch.device) -> str:
    """--sgd auto: fused on a GPU; torch's default on the CPU (a loop per tensor: earlier CPU runs stay bit for bit,
    foreach rounds differently there)."""
    if requested == "auto":
        return "fused" if device.type == "cuda" else "default"
    return requested


def make_parts(
    cfg: TrainConfig,
    num_classes: int,
    ctx: DistContext,
    precision: Precision,
    schedule,
    *,
    model_hook=None,
    compile_mode: str | None = None,
) -> tuple[TrainParts, nn.Module, dict[str, int]]:
    """(parts of the train step, the model to evaluate, weight-decay counts): the model (torchvision --arch with
    BlurPool/zero-init/channels_last as configured) on the device, SGD with weight decay by module type, the
    GradScaler, the EMA if --ema, the step as --step says (eager, compiled, or a CUDA graph), wrapped for DDP.
    `schedule`: anything with lr_at/momentum_at. model_hook(model) -> model and compile_mode: for the levers of
    `rn50 bench step` (a changed stem, another torch.compile mode)."""
    from training.graphs import GraphedStep

    mode, why = resolve_step(
        cfg.step,
        ctx.device,
        deterministic=cfg.deterministic,
        world_size=ctx.world_size,
        grad_accum=cfg.grad_accum,
        precision=precision.name,
    )
    raw = build_model(cfg.arch, num_classes, cfg.zero_init_residual, cfg.blurpool, cfg.channels_last)
    raw = (model_hook(raw) if model_hook else raw).to(ctx.device)
    optimizer, counts = build_optimizer(
        raw, cfg.weight_decay, cfg.momentum, cfg.nesterov, sgd_impl(cfg.sgd, ctx.device)
    )
    model, eval_model = wrap_model(raw, mode in ("compile", "graphs"), ctx, compile_mode)
    ema = ModelEMA(raw, cfg.ema_decay) if cfg.ema else None
    parts = TrainParts(
        model=model,
        raw_model=raw,
        optimizer=optimizer,
        scaler=make_scaler(precision, ctx.device),
        schedule=schedule,
        precision=precision,
        label_smoothing=cfg.label_smoothing,
        grad_accum=cfg.grad_accum,
        ema=ema,
        step_mode=mode,
        step_why=why,
    )
    if mode == "graphs":
        parts.graphed = GraphedStep(model, raw, optimizer, precision, cfg.label_smoothing, ema)
    return parts, eval_model, counts
