"""`--step graphs`: the whole optimizer step -- forward, loss, backward, SGD update, EMA -- as one CUDA graph.

An eager ResNet-50 step launches about a thousand kernels; at 7,000+ img/s on a Hopper the host can hardly launch
them as fast as the GPU runs them. torch.compile fuses many of them; a CUDA graph replays the rest with one launch.
This is what NVIDIA's MLPerf ResNet-50 does (MXNet), here in PyTorch:

- One graph per input shape (training resolution), captured at the first batch of that shape: a few warm-up steps on
  a side stream (they compile the model, pick cuDNN kernels and allocate), then the capture. The warm-up steps change
  the weights, so the state before them is copied aside and put back: the run is exactly as if they never happened.
  Resolutions only grow (progressive resizing), so a new capture drops the previous graph and its memory.
- Static buffers: each batch is copied into the graph's input tensors; the LR and momentum of the step are written
  into two device scalars before the replay (`fill_` launches a kernel with the value; nothing is copied or waited
  for). The SGD update is `sgd_update` below: torch.optim.SGD's arithmetic with tensor LR and momentum (a graph
  cannot see a Python float change), on the optimizer's own momentum buffers, so checkpoints keep torch's format.
- The capture runs in "thread_local" mode: torch's default ("global") mode fails a capture when any other thread of
  the process makes a CUDA call meanwhile, and DALI's executor and FFCV's threads make such calls. Should a capture
  still fail, `CaptureFailed` says why; `training.engine.train_step` then drops the graph and continues with the
  compiled step (one line on stderr), from the state the run had before the capture's warm-up steps.
- bf16/fp32 only (fp16's GradScaler decides on the host whether to skip a step), one process (DDP's collectives
  inside a captured graph are not supported here), one batch per step (no --grad-accum). `resolve_step` falls back
  to the compiled step, and says why, outside that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from training.engine import CaptureFailed, Precision, hard_labels, soft_cross_entropy

WARMUP_STEPS = 3  # before a capture: compilation, cuDNN autotuning and allocations happen here, not in the graph


@torch.no_grad()
def sgd_update(
    groups: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], float]],
    lr: torch.Tensor,
    momentum: torch.Tensor,
    nesterov: bool = False,
) -> None:
    """torch.optim.SGD's step (dampening 0) with LR and momentum as device scalars, for lists of
    (params, grads, momentum buffers, weight decay). Buffers start at zero, which equals torch's first step
    (buffer = gradient). Every operation is a foreach kernel with no host value, so it can be captured."""
    for params, grads, bufs, weight_decay in groups:
        if weight_decay:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        update = torch._foreach_add(grads, torch._foreach_mul(bufs, momentum)) if nesterov else bufs
        torch._foreach_add_(params, torch._foreach_mul(update, -lr))


@dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph, or None when replaying eagerly (capture=False)
    images: torch.Tensor
    targets: torch.Tensor
    loss_sum: torch.Tensor
    correct: torch.Tensor


class GraphedStep:
    """Call with (images, targets, lr, momentum) -> (summed loss, correct top-1) for one optimizer step.

    model: the module to train (compiled or not, not DDP); raw_model: the plain module whose parameters the optimizer
    holds; optimizer: a torch.optim.SGD (its groups' weight decay and nesterov are used, its state holds the momentum
    buffers). capture=False runs the same step eagerly at every call, warm-up and state restore included: that is
    how the CPU tests check it against the plain step."""

    def __init__(
        self,
        model: nn.Module,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        label_smoothing: float,
        ema=None,
        capture: bool = True,
    ) -> None:
        device = next(raw_model.parameters()).device
        if capture and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (capture=False runs the step eagerly)")
        self.model, self.raw_model, self.optimizer = model, raw_model, optimizer
        self.precision, self.label_smoothing, self.ema = precision, label_smoothing, ema
        self.capture, self.device = capture, device
        self.lr = torch.zeros((), device=device)
        self.momentum = torch.zeros((), device=device)
        self.nesterov = any(g.get("nesterov", False) for g in optimizer.param_groups)
        self.current: tuple | None = None  # (shape key, _Captured)
        self.captures = 0  # graphs captured so far (one per resolution)

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, lr: float, momentum: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.lr.fill_(lr)
        self.momentum.fill_(momentum)
        key = (tuple(images.shape), images.dtype, tuple(targets.shape), targets.dtype)
        if self.current is None or self.current[0] != key:
            self.current = None  # the previous shape's graph and memory go first
            self.current = (key, self._capture(images, targets))
        cap = self.current[1]
        if cap.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum, correct = self._step(images, targets)
        else:
            cap.images.copy_(images)
            cap.targets.copy_(targets)
            cap.graph.replay()
            loss_sum, correct = cap.loss_sum, cap.correct
            if self.ema is not None:
                self.ema.updates += 1  # the EMA's arithmetic is in the graph; its Python counter is not
        return loss_sum.clone(), correct.clone()

    # ---- one step, as captured

    def _groups(self):
        groups = []
        for g in self.optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            bufs = [self.optimizer.state[p]["momentum_buffer"] for p in params]
            groups.append((params, [p.grad for p in params], bufs, g["weight_decay"]))
        return groups

    def _step(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.precision.autocast_dtype
        # the autocast cast cache would hold tensors from outside the graph; without it casts are recorded too
        cast = (
            torch.autocast(self.device.type, dtype=dtype, cache_enabled=False)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with cast:
            logits = self.model(images)
        loss = soft_cross_entropy(logits, targets, self.label_smoothing)
        loss.backward()
        sgd_update(self._groups(), self.lr, self.momentum, self.nesterov)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        return loss.detach() * images.shape[0], (logits.detach().argmax(dim=1) == hard_labels(targets)).sum()

    # ---- capture

    def _state(self) -> list[torch.Tensor]:
        """Every tensor a step changes: weights, BatchNorm buffers, momentum buffers, the EMA."""
        tensors = list(self.raw_model.parameters()) + list(self.raw_model.buffers())
        tensors += [
            self.optimizer.state[p]["momentum_buffer"] for g in self.optimizer.param_groups for p in g["params"]
        ]
        if self.ema is not None:
            tensors += list(self.ema.module.state_dict().values())
        return tensors

    def _capture(self, images: torch.Tensor, targets: torch.Tensor) -> _Captured:
        for g in self.optimizer.param_groups:  # zero buffers where torch would create them at the first step
            for p in g["params"]:
                state = self.optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        tensors = self._state()
        saved = [t.detach().clone() for t in tensors]
        ema_updates = self.ema.updates if self.ema is not None else 0
        static_images = images.clone()
        static_targets = targets.clone()
        if not self.capture:
            self._warm_up(static_images, static_targets)
            self._put_back(tensors, saved, ema_updates)
            return _Captured(None, static_images, static_targets, torch.zeros(()), torch.zeros(()))
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._warm_up(static_images, static_targets)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # backward creates the gradients inside the graph's memory
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                loss_sum, correct = self._step(static_images, static_targets)
        except Exception as e:
            self.optimizer.zero_grad(set_to_none=True)
            self._put_back(tensors, saved, ema_updates)
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise CaptureFailed(f"{type(e).__name__}: {first}") from e
        self._put_back(tensors, saved, ema_updates)
        self.captures += 1
        return _Captured(graph, static_images, static_targets, loss_sum, correct)

    def _warm_up(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        for _ in range(WARMUP_STEPS):
            self.optimizer.zero_grad(set_to_none=True)
            self._step(images, targets)

    def _put_back(self, tensors: list[torch.Tensor], saved: list[torch.Tensor], ema_updates: int) -> None:
        """Undo the warm-up steps: the run continues from the state it had before the capture."""
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)
        if self.ema is not None:
            self.ema.updates = ema_updates
