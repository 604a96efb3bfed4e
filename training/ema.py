"""Exponential moving average of a model's weights (Polyak averaging), updated after every optimizer step."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """`ema = decay * ema + (1 - decay) * weights` for parameters and floating buffers; integer buffers (BN's
    num_batches_tracked) are copied. The average lives on the model's device in fp32, beside the model it follows.

    Usage: `ema = ModelEMA(model, 0.9998)`; after each `optimizer.step()`: `ema.update(model)`; evaluate `ema.module`.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        ema_float, model_float = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.dtype.is_floating_point:
                ema_float.append(e)
                model_float.append(m.detach())
            else:
                e.copy_(m)
        # one fused kernel per tensor group instead of one per tensor
        torch._foreach_lerp_(ema_float, model_float, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "decay": self.decay, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = state["decay"]
        self.updates = state["updates"]
