"""The network: torchvision ResNets from scratch, optional BlurPool and zero-init residuals, and the optimizer groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from training.config import ARCHS


class BlurPoolConv2d(nn.Module):
    """A fixed 3x3 binomial low-pass filter, depthwise, in front of a strided convolution.

    Anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again"); ffcv-imagenet uses
    it for every ResNet-50 recipe. The wrapped conv keeps its stride, so shapes do not change.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(taps, taps) / 16.0
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.conv.in_channels)
        return self.conv(x)


def apply_blurpool(module: nn.Module, min_channels: int = 16) -> int:
    """Wrap, in place, every Conv2d with stride > 1 and at least `min_channels` inputs; returns how many.

    The stem conv (3 input channels) is left alone, as in ffcv-imagenet: blurring the raw image only loses detail.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= min_channels:
            setattr(module, name, BlurPoolConv2d(child))
            count += 1
        else:
            count += apply_blurpool(child, min_channels)
    return count


def build_model(
    arch: str, num_classes: int, zero_init_residual: bool = False, blurpool: bool = False, channels_last: bool = True
) -> nn.Module:
    """torchvision `arch(weights=None)`, optionally BlurPool'd; channels_last when asked (the model's parameters,
    so cuDNN picks NHWC kernels for NHWC inputs)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    model = getattr(torchvision.models, arch)(
        weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual
    )
    if blurpool:
        apply_blurpool(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


_NO_DECAY_MODULES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float) -> tuple[list[dict], dict[str, int]]:
    """Two SGD groups chosen by module type: weights of conv/linear layers decay; normalisation parameters and every
    bias do not. (Name matching like `'bn' in name` misses ResNet's `downsample.1` BatchNorm.)

    Returns the groups and counts {decay_tensors, no_decay_tensors, decay_params, no_decay_params} for the log.
    """
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NO_DECAY_MODULES) or pname == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    counts = {
        "decay_tensors": len(decay),
        "no_decay_tensors": len(no_decay),
        "decay_params": sum(p.numel() for p in decay),
        "no_decay_params": sum(p.numel() for p in no_decay),
    }
    return groups, counts


SGD_KERNELS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def build_optimizer(
    model: nn.Module, weight_decay: float, momentum: float, nesterov: bool, impl: str = "default"
) -> tuple[torch.optim.SGD, dict[str, int]]:
    """SGD over the weight-decay groups. impl: "default" (torch's choice: foreach on a GPU, a loop per tensor on the
    CPU), "foreach" (a few kernels per group) or "fused" (one kernel; with a GradScaler it also takes the scale and
    the inf check on the device, so fp16 needs no host sync per step)."""
    if impl not in SGD_KERNELS:
        raise ValueError(f"SGD impl must be one of {', '.join(SGD_KERNELS)}, got {impl!r}")
    groups, counts = param_groups(model, weight_decay)
    # lr is set by the schedule before every step; 0.0 here only keeps a step before that harmless.
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=momentum, nesterov=nesterov, **SGD_KERNELS[impl])
    return optimizer, counts


def sgd_kernels(optimizer: torch.optim.Optimizer) -> str:
    """fused, foreach, or "default" (torch's choice) for the run header."""
    d = optimizer.defaults
    return "fused" if d.get("fused") else "foreach" if d.get("foreach") else "default"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile: what checkpoints hold, so keys never carry
    `module.` or `_orig_mod.` prefixes."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
