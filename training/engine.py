"""The training step, one epoch of it, and evaluation. Plain functions: everything they touch is passed in.

Sync points are deliberate: the loop never calls `.item()` except every `log_every` optimizer steps (where the
window's loss/accuracy are all-reduced over ranks for the progress bar and TensorBoard) and once at the end of the
epoch. Everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import DistContext, all_reduce_sum
from training.schedules import Schedule, apply_schedule

# ---------------------------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    name: str  # bf16 | fp16 | fp32
    autocast_dtype: torch.dtype | None  # None: no autocast
    input_dtype: torch.dtype  # what the loader hands over
    use_scaler: bool  # fp16 needs loss scaling; bf16 has fp32's exponent range and does not

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs with native bf16 (compute capability >= 8: A100, H100, L4, RTX 30xx+), fp16 with a
    GradScaler on older ones (T4 = 7.5, V100 = 7.0), fp32 on the CPU."""
    name = requested
    if requested == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
        else:
            name = "fp32"
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, torch.bfloat16, use_scaler=False)
    if name == "fp16":
        return Precision("fp16", torch.float16, torch.float16, use_scaler=True)
    if name == "fp32":
        return Precision("fp32", None, torch.float32, use_scaler=False)
    raise ValueError(f"unknown precision {requested!r}")


def make_scaler(precision: Precision, device: torch.device) -> torch.amp.GradScaler:
    """Always a GradScaler object (disabled unless fp16), so the step code has one path and checkpoints one key."""
    return torch.amp.GradScaler(device.type, enabled=precision.use_scaler)


# ---------------------------------------------------------------------------------------------- loss and metrics


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy for int64 class targets (B,) or probability targets (B, C) (mixup/cutmix), in fp32."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def hard_labels(targets: torch.Tensor) -> torch.Tensor:
    """Class indices for accuracy: the targets themselves, or the dominant class of soft targets."""
    return targets.argmax(dim=1) if targets.ndim == 2 else targets


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> list[torch.Tensor]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


# ---------------------------------------------------------------------------------------------- training

# (images, labels, epoch=, batch=) -> (images, targets): the run's augmentation recipe (pipeline.augment.Recipe).
# The batch index lets it derive its random draws from (seed, epoch, batch, rank) instead of carrying a generator's
# state from batch to batch.
BatchTransform = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def resolve_step(
    requested: str,
    device: torch.device,
    *,
    deterministic: bool = False,
    world_size: int = 1,
    grad_accum: int = 1,
    precision: str = "fp32",
) -> tuple[str, str]:
    """(eager | compile | graphs, why) for --step. auto: compile on a GPU (an H200 measured 6,800 img/s compiled
    against 4,700 eager for ResNet-50 bf16 at 224 px: ../shared/gpu/README.md), eager on the CPU (compiling costs
    minutes there and gains little) and with --deterministic (identity after a restart was checked for the eager step
    only). graphs falls back to compile where a whole-step CUDA graph cannot be captured (training.graphs)."""
    if requested == "auto":
        if device.type != "cuda":
            return "eager", "auto: eager on the CPU"
        if deterministic:
            return "eager", "auto: eager with --deterministic"
        return "compile", "auto: torch.compile on a GPU"
    if requested == "graphs":
        blocker = (
            "not on a CUDA device"
            if device.type != "cuda"
            else f"{world_size} processes (DDP)"
            if world_size > 1
            else f"--grad-accum {grad_accum}"
            if grad_accum > 1
            else "fp16 (GradScaler decides on the host)"
            if precision == "fp16"
            else ""
        )
        if blocker:
            return "compile", f"graphs not possible ({blocker}): compiled step instead"
    return requested, "asked for"


@dataclass
class TrainParts:
    """What a training step needs besides the batch. `model` may be DDP- and/or compile-wrapped; `raw_model` is
    the plain module (EMA, checkpoints). `graphed`: the whole step as a CUDA graph (--step graphs), else None."""

    model: nn.Module
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    precision: Precision
    label_smoothing: float
    grad_accum: int = 1
    ema: object | None = None  # training.ema.ModelEMA
    graphed: Callable | None = None  # training.graphs.GraphedStep
    step_mode: str = "eager"  # eager | compile | graphs, and why (for the run header)
    step_why: str = ""


def train_step(
    parts: TrainParts, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], step: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """One optimizer step over `grad_accum` micro-batches: set the scheduled LR, forward/backward each micro-batch
    (gradients all-reduced by DDP only on the last one), unscale-free step through the GradScaler, EMA update.
    With a graphed step (one micro-batch) the same happens in one CUDA graph replay.

    Returns (summed loss over samples, number of correct top-1 predictions, samples, lr); tensors stay on device."""
    lr = apply_schedule(parts.optimizer, parts.schedule, step)
    if parts.graphed is not None:
        ((images, targets),) = micro_batches
        try:
            loss_sum, correct = parts.graphed(images, targets, lr, parts.optimizer.param_groups[0]["momentum"])
            return loss_sum, correct, images.shape[0], lr
        except CaptureFailed as e:  # the state is as before the attempt: this step runs compiled, as do the next
            parts.graphed, parts.step_mode = None, "compile"
            parts.step_why = f"graphs: the CUDA graph capture failed ({e}): compiled step instead"
            print(f"rn50: --step {parts.step_why}", file=sys.stderr, flush=True)
    model, n_micro = parts.model, len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    samples = 0
    for i, (images, targets) in enumerate(micro_batches):
        last = i == n_micro - 1
        sync = (
            model.no_sync()
            if (not last and isinstance(model, nn.parallel.DistributedDataParallel))
            else contextlib.nullcontext()
        )
        with sync:
            with parts.precision.autocast(device):
                logits = model(images)
            loss = soft_cross_entropy(logits, targets, parts.label_smoothing)
            # Each micro-batch's mean loss / n_micro: the accumulated gradient equals the big batch's mean gradient.
            parts.scaler.scale(loss / n_micro).backward()
        n = images.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.detach().argmax(dim=1) == hard_labels(targets)).sum()
        samples += n
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    parts.optimizer.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update(parts.raw_model)
    return loss_sum, correct, samples, lr


@dataclass
class EpochProgress:
    """Running sums of an epoch over all ranks: what a mid-epoch checkpoint keeps so that the resumed epoch's log
    line (loss, top-1, img/s, data wait) covers the whole epoch. seconds/data_wait_s: rank 0's, downtime excluded."""

    loss_sum: float = 0.0
    correct: float = 0.0
    samples: int = 0
    seconds: float = 0.0
    data_wait_s: float = 0.0

    def state_dict(self) -> dict:
        return {
            "loss_sum": float(self.loss_sum),
            "correct": float(self.correct),
            "samples": int(self.samples),
            "seconds": float(self.seconds),
            "data_wait_s": float(self.data_wait_s),
        }

    @classmethod
    def from_state(cls, state: dict | None) -> EpochProgress:
        return cls(**state) if state else cls()


@dataclass
class EpochStats:
    loss: float
    top1: float
    samples: int  # all ranks
    seconds: float
    data_wait_s: float  # this rank's time blocked on the loader
    lr: float
    completed: bool = True  # False: stopped early at a step boundary (a stop request)
    first_step_s: float = 0.0  # host time of the epoch's first step: torch.compile / graph capture happen there

    @property
    def images_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_pct(self) -> float:
        return 100.0 * self.data_wait_s / self.seconds if self.seconds > 0 else 0.0

    def state_dict(self) -> dict:
        return {
            "loss": self.loss,
            "top1": self.top1,
            "samples": self.samples,
            "seconds": self.seconds,
            "data_wait_s": self.data_wait_s,
            "lr": self.lr,
        }

    @classmethod
    def from_state(cls, state: dict) -> EpochStats:
        return cls(**state)


def _timed(it: Iterator, waits: list[float]):
    """Yield from `it`, adding the time spent blocked in next() to waits[0] (the loader's share of the epoch)."""
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        waits[0] += time.perf_counter() - t0
        yield item


class CaptureFailed(RuntimeError):
    """A CUDA graph of the step (training.graphs) could not be captured; weights and optimizer state are as they
    were before the attempt, so the step can run compiled instead."""


class NonFiniteLoss(RuntimeError):
    pass


def _sum_over_ranks(sums: torch.Tensor, count: int, ctx: DistContext) -> list[float]:
    """[*sums, count] summed over ranks, on the host. `count` is a host number (sample counts are known there; a
    device tensor built from it every step would be a blocking copy), joined to the device sums for one all-reduce."""
    counted = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64).to(sums.device)])
    return all_reduce_sum(counted, ctx).tolist()


# boundary(steps done in this epoch, snapshot) -> stop? Called after every optimizer step. `snapshot()` all-reduces
# the epoch's running sums (a collective: call it on every rank or on none).
Boundary = Callable[[int, Callable[[], EpochProgress]], bool]


def train_one_epoch(
    parts: TrainParts,
    loader,
    epoch: int,
    steps_per_epoch: int,
    ctx: DistContext,
    *,
    start_batch: int = 0,
    batch_transform: BatchTransform | None = None,
    log_every: int = 50,
    on_log: Callable[[int, dict], None] | None = None,
    progress: bool = False,
    resumed: EpochProgress | None = None,
    boundary: Boundary | None = None,
) -> EpochStats:
    """Train one epoch from `start_batch` (0 for a whole epoch; a multiple of grad_accum when resuming mid-epoch,
    with `resumed` holding the running sums saved at that point). The caller has set the loader's
    epoch/position/resolution. Only the first steps_per_epoch * grad_accum batches are used, so every optimizer
    step sees a full accumulated batch.

    on_log(step, scalars): called at log intervals with the window's all-reduced loss/top-1, LR, img/s, data wait.
    boundary: see `Boundary`; returning True ends the epoch there (stats.completed is then False).
    """
    parts.model.train()
    accum = parts.grad_accum
    if start_batch % accum:
        raise ValueError(f"start_batch {start_batch} is not a multiple of grad_accum {accum}")
    first_step = start_batch // accum
    step = epoch * steps_per_epoch + first_step
    device = ctx.device
    resumed = resumed or EpochProgress()
    # Loss and hit sums stay on the device; sample counts are known on the host. Building a device tensor from a
    # Python number each step would be a blocking host-to-device copy, i.e. a sync point per step.
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct
    if ctx.is_main:  # the saved sums are all ranks' together: add them once
        totals += torch.tensor([resumed.loss_sum, resumed.correct], dtype=torch.float64).to(device)
    window = torch.zeros(2, device=device, dtype=torch.float64)
    total_n = resumed.samples if ctx.is_main else 0
    window_n = 0
    waits = [resumed.data_wait_s]
    window_start, window_wait, lr = time.perf_counter(), waits[0], parts.schedule.lr_at(step)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=steps_per_epoch,
            initial=first_step,
            desc=f"epoch {epoch}",
            unit="step",
            leave=True,
            dynamic_ncols=True,
        )
    t_start = time.perf_counter() - resumed.seconds

    def snapshot() -> EpochProgress:
        t = _sum_over_ranks(totals, total_n, ctx)
        return EpochProgress(t[0], t[1], int(t[2]), time.perf_counter() - t_start, waits[0])

    source = iter(loader)
    batches = _timed(source, waits)
    micro: list[tuple[torch.Tensor, torch.Tensor]] = []
    batch_index = start_batch
    completed = True
    first_step_s = None
    for _ in range(first_step, steps_per_epoch):
        micro.clear()
        for images, labels in batches:
            targets = labels
            if batch_transform is not None:
                images, targets = batch_transform(images, labels, epoch=epoch, batch=batch_index)
            batch_index += 1
            micro.append((images, targets))
            if len(micro) == accum:
                break
        if len(micro) < accum:
            break  # the loader ran short (should not happen: len(loader) >= steps_per_epoch * accum)
        t_step = time.perf_counter()
        loss_sum, correct, n, lr = train_step(parts, micro, step, device)
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_step
        stats = torch.stack([loss_sum.double(), correct.double()])
        totals += stats
        window += stats
        total_n += n
        window_n += n
        step += 1
        if bar is not None:
            bar.update(1)
        if step % log_every == 0 or step == (epoch + 1) * steps_per_epoch:
            w = _sum_over_ranks(window, window_n, ctx)  # the sync point of the loop
            now = time.perf_counter()
            wait = waits[0] - window_wait
            scalars = {
                "loss": w[0] / max(w[2], 1),
                "top1": 100.0 * w[1] / max(w[2], 1),
                "lr": lr,
                "images_per_s": w[2] / max(now - window_start, 1e-9),
                "data_wait_pct": 100.0 * wait / max(now - window_start, 1e-9),
            }
            if not math.isfinite(scalars["loss"]):
                raise NonFiniteLoss(
                    f"training loss is {scalars['loss']} at epoch {epoch}, step {step}; the last "
                    "checkpoint is intact. Lower --max-lr (rn50 lr-find suggests one) or use "
                    "--precision fp32 to check for fp16 overflow"
                )
            if on_log is not None:
                on_log(step, scalars)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{scalars['loss']:.3f}",
                    top1=f"{scalars['top1']:.1f}",
                    lr=f"{lr:.4g}",
                    img_s=f"{scalars['images_per_s']:.0f}",
                )
            window.zero_()
            window_n = 0
            window_start, window_wait = now, waits[0]
        if boundary is not None and boundary(step - epoch * steps_per_epoch, snapshot):
            completed = step == (epoch + 1) * steps_per_epoch
            break
    if hasattr(source, "close"):
        source.close()  # an epoch cut short of the loader's end releases the backend's iterator now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t_start
    if bar is not None:
        bar.close()
    t = _sum_over_ranks(totals, total_n, ctx)
    return EpochStats(
        loss=t[0] / max(t[2], 1),
        top1=100.0 * t[1] / max(t[2], 1),
        samples=int(t[2]),
        seconds=seconds,
        data_wait_s=waits[0],
        lr=lr,
        completed=completed,
        first_step_s=first_step_s or 0.0,
    )


# ---------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    precision: Precision,
    ctx: DistContext,
    tta: bool = False,
    epoch: int = 0,
    should_stop: Callable[[], bool] | None = None,
    static_shapes: bool = False,
) -> dict | None:
    """Top-1/top-5 (%) and mean cross-entropy over the whole split, each sample counted once across ranks.

    Under DDP the loader pads the last shard with repeats of other ranks' samples; `loader.num_valid(b)` says how
    many leading samples of batch b are real, and only those are counted. tta: the logits of the horizontally
    flipped batch are added (ffcv-imagenet's lr_tta). Pass the plain module, not the DDP wrapper.
    should_stop: polled before every batch (on every rank: it may be a collective); True abandons the pass and
    returns None. static_shapes: pad a short last batch to the full batch size (its padding is not counted), so a
    compiled model sees one shape and compiles once.
    """
    model.eval()
    device = ctx.device
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits
    samples = 0  # on the host: no per-batch host-to-device copy
    loader.set_epoch(epoch)
    source = iter(loader)
    for b, (images, labels) in enumerate(source):
        if should_stop is not None and should_stop():
            if hasattr(source, "close"):
                source.close()
            return None
        valid = loader.num_valid(b, epoch=epoch)
        if valid == 0:
            continue
        if not static_shapes:
            images = images[:valid]
        elif images.shape[0] < loader.batch_size:
            padded = images.new_zeros((loader.batch_size, *images.shape[1:]))
            padded = padded.contiguous(memory_format=torch.channels_last)
            padded[: images.shape[0]] = images
            images = padded
        with precision.autocast(device):
            logits = model(images)
            if tta:
                logits = logits + model(torch.flip(images, dims=[3]))
        logits, labels = logits[:valid].float() / (2.0 if tta else 1.0), labels[:valid]
        top1, top5 = topk_correct(logits, labels, (1, 5))
        sums += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(), top1.double(), top5.double()])
        samples += valid
    s = _sum_over_ranks(sums, samples, ctx)
    n = max(s[3], 1.0)
    return {"loss": s[0] / n, "top1": 100.0 * s[1] / n, "top5": 100.0 * s[2] / n, "samples": int(s[3])}
