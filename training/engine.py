"""The training step, what the epoch loop needs around it (micro-batches, the `Meter`), and evaluation. Plain
functions and small objects: everything they touch is passed in. The epoch loop itself is training.trainer.train_epoch.

Sync points are deliberate: nothing here calls `.item()` except the Meter, every `log_every` optimizer steps (where
the window's loss/accuracy are all-reduced over ranks for the progress bar and TensorBoard) and once at the end of
the epoch. Everything else stays on the device.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
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
    """(eager | compile | graphs, why) for --step. auto: compile on a GPU (faster than eager there; README, "The
    train step"), eager on the CPU (compiling costs minutes there and gains little) and with --deterministic (identity
    after a restart was checked for the eager step only). graphs falls back to compile where a whole-step CUDA graph
    cannot be captured (training.graphs)."""
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


def micro_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    accum: int,
    transform: BatchTransform | None = None,
    *,
    epoch: int = 0,
    first_batch: int = 0,
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The batches in groups of `accum` (images, targets), one group per optimizer step; a last group short of `accum`
    is dropped. targets: the labels, or what `transform` (the augmentation recipe) makes of batch number
    first_batch, first_batch + 1, ... of `epoch` (its draws are keyed by that number)."""
    group: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch, (images, labels) in enumerate(batches, start=first_batch):
        if transform is not None:
            images, labels = transform(images, labels, epoch=epoch, batch=batch)
        group.append((images, labels))
        if len(group) == accum:
            yield group
            group = []


class Meter:
    """An epoch's numbers as they accrue: loss and hit sums on the device (a device tensor made from a host number
    every step would be a blocking copy, a sync per step), sample counts on the host, the time blocked on the loader,
    the host time of the first step (where torch.compile or a graph capture happen), and the current log window.
    `resumed`: the running sums a mid-epoch checkpoint saved, all ranks' together (so rank 0 adds them once)."""

    def __init__(self, ctx: DistContext, lr: float, resumed: EpochProgress | None = None) -> None:
        resumed = resumed or EpochProgress()
        self.ctx, self.lr = ctx, lr
        self.totals = torch.zeros(2, device=ctx.device, dtype=torch.float64)  # loss sum, correct
        if ctx.is_main:
            self.totals += torch.tensor([resumed.loss_sum, resumed.correct], dtype=torch.float64).to(ctx.device)
        self.window = torch.zeros(2, device=ctx.device, dtype=torch.float64)
        self.samples, self.window_samples = (resumed.samples if ctx.is_main else 0), 0
        self.wait, self.first_step_s = resumed.data_wait_s, None
        self.window_start, self.window_wait = time.perf_counter(), self.wait
        self.started = time.perf_counter() - resumed.seconds

    def timed(self, it: Iterator) -> Iterator:
        """Yield from `it`, adding the time spent blocked in next() to `wait` (the loader's share of the epoch)."""
        while True:
            t0 = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            yield item

    def add(self, loss_sum: torch.Tensor, correct: torch.Tensor, n: int, lr: float, seconds: float) -> None:
        """One optimizer step's train_step result and its host time."""
        stats = torch.stack([loss_sum.double(), correct.double()])
        self.totals += stats
        self.window += stats
        self.samples += n
        self.window_samples += n
        self.lr = lr
        if self.first_step_s is None:
            self.first_step_s = seconds

    def close_window(self) -> dict[str, float]:
        """The window's loss, top-1, LR, img/s and data wait over all ranks (the sync point of the loop); a new
        window starts."""
        w = _sum_over_ranks(self.window, self.window_samples, self.ctx)
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        scalars = {
            "loss": w[0] / max(w[2], 1),
            "top1": 100.0 * w[1] / max(w[2], 1),
            "lr": self.lr,
            "images_per_s": w[2] / elapsed,
            "data_wait_pct": 100.0 * (self.wait - self.window_wait) / elapsed,
        }
        self.window.zero_()
        self.window_samples = 0
        self.window_start, self.window_wait = now, self.wait
        return scalars

    def snapshot(self) -> EpochProgress:
        """The epoch's running sums over all ranks so far, for a mid-epoch checkpoint (a collective: call it on
        every rank or on none)."""
        t = _sum_over_ranks(self.totals, self.samples, self.ctx)
        return EpochProgress(t[0], t[1], int(t[2]), time.perf_counter() - self.started, self.wait)

    def result(self, completed: bool) -> EpochStats:
        """The epoch's stats over all ranks, once its last step has run (completed=False: stopped early)."""
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        seconds = time.perf_counter() - self.started
        t = _sum_over_ranks(self.totals, self.samples, self.ctx)
        return EpochStats(
            loss=t[0] / max(t[2], 1),
            top1=100.0 * t[1] / max(t[2], 1),
            samples=int(t[2]),
            seconds=seconds,
            data_wait_s=self.wait,
            lr=self.lr,
            completed=completed,
            first_step_s=self.first_step_s or 0.0,
        )


def check_finite(loss: float, epoch: int, step: int) -> None:
    """A loss that is not finite stops the run (checked at each log window, where the loss is on the host anyway)."""
    if not math.isfinite(loss):
        raise NonFiniteLoss(
            f"training loss is {loss} at epoch {epoch}, step {step}; the last checkpoint is intact. Lower --max-lr "
            "(rn50 lr-find suggests one) or use --precision fp32 to check for fp16 overflow"
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
