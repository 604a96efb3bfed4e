"""MixUp and CutMix on a batch, with soft targets (torchvision v2 semantics, which the tests use as the reference).

images: (B, 3, H, W) float, any memory format (kept). labels: (B,) int64 class indices or (B, C) soft targets.
Outputs: images of the same shape, dtype and layout, and (B, C) float32 targets whose rows sum to 1.

Each function is split in two: a draw made on the host from a CPU generator (a probability check and a few numbers
per batch) and the arithmetic on the batch's device, which takes the drawn numbers as Python scalars, so mixing
never copies anything to the device and never waits for it.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int64 -> (B, C) float32, with label smoothing spread over all classes (as CrossEntropyLoss does)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    # scatter rather than F.one_hot, which checks the label range with a device-to-host read on some devices
    t = torch.zeros(labels.shape[0], num_classes, device=labels.device).scatter_(1, labels.long().view(-1, 1), 1.0)
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


def soft_targets(labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if labels.ndim == 2:
        return labels.float()
    if num_classes is None:
        raise ValueError("num_classes is needed to mix integer labels")
    return one_hot(labels, num_classes)


def uniform(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Float64 uniforms in [0, 1) from a CPU generator."""
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta cannot take a generator; a numpy generator seeded from ours keeps the draw reproducible.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def keep_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`out` in the memory format of `like` (channels_last or contiguous)."""
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous() if like.is_contiguous() else out


# ------------------------------------------------------------------------------------------------------------ mixup


def draw_mixup(alpha: float, p: float, generator: torch.Generator | None, lam: float | None = None) -> float | None:
    """lam ~ Beta(alpha, alpha) for the batch (or the given `lam`), or None (probability 1 - p): the batch passes
    unchanged."""
    if float(uniform(generator)) >= p:
        return None
    return beta(alpha, generator) if lam is None else float(lam)


def apply_mixup(images: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample mixed with the previous one in the batch: lam * own + (1 - lam) * previous."""
    mixed = images.roll(1, 0).mul_(1.0 - lam).add_(images.mul(lam))
    return keep_format(mixed, images), targets.roll(1, 0).mul_(1.0 - lam).add_(targets.mul(lam))


def mixup(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.2,
    num_classes: int | None = None,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    lam: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (torchvision v2 semantics): each sample is mixed with the previous one in the batch, weight
    lam ~ Beta(alpha, alpha) for the batch. With probability 1 - p the batch passes unchanged (targets one-hot).
    `lam` fixes the weight instead of drawing it."""
    targets = soft_targets(labels, num_classes)
    lam = draw_mixup(alpha, p, generator, lam)
    if lam is None:
        return images, targets
    return apply_mixup(images, targets, lam)


# ----------------------------------------------------------------------------------------------------------- cutmix

# (top, left, bottom, right) of the pasted box and the share of the image left as it was
CutBox = tuple[int, int, int, int, float]


def cutmix_box(height: int, width: int, lam: float, cy: int, cx: int) -> CutBox:
    """torchvision's CutMix box: about (1 - lam) of the image, centred at (cy, cx), clipped at the borders."""
    r = 0.5 * math.sqrt(1.0 - lam)
    rw, rh = int(r * width), int(r * height)
    y1, x1, y2, x2 = max(cy - rh, 0), max(cx - rw, 0), min(cy + rh, height), min(cx + rw, width)
    return y1, x1, y2, x2, 1.0 - (x2 - x1) * (y2 - y1) / (width * height)


def draw_cutmix(
    height: int,
    width: int,
    alpha: float,
    p: float,
    generator: torch.Generator | None,
    lam: float | None = None,
    center: tuple[int, int] | None = None,
) -> CutBox | None:
    """The box to paste (lam ~ Beta(alpha, alpha), a uniform centre pixel (y, x); either may be given instead), or
    None (probability 1 - p)."""
    if float(uniform(generator)) >= p:
        return None
    lam = beta(alpha, generator) if lam is None else float(lam)
    if center is None:
        cx = int(torch.randint(width, (), generator=generator))
        cy = int(torch.randint(height, (), generator=generator))
    else:
        cy, cx = center
    return cutmix_box(height, width, lam, cy, cx)


def apply_cutmix(images: torch.Tensor, targets: torch.Tensor, box: CutBox) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste the box from the previous sample; targets mixed by the area actually pasted."""
    y1, x1, y2, x2, kept = box
    out = images.clone()
    out[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    return keep_format(out, images), targets.roll(1, 0).mul_(1.0 - kept).add_(targets.mul(kept))


def cutmix(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    num_classes: int | None = None,
    p: float = 1.0,
    generator: torch.Generator | None = None,
    lam: float | None = None,
    center: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (torchvision v2 semantics): a box of area about (1 - lam) of the image, lam ~ Beta(alpha, alpha), centred
    at a uniform pixel (clipped at the borders), is pasted from the previous sample; targets are mixed by the area
    actually pasted. With probability 1 - p the batch passes unchanged. `lam`/`center` (y, x) fix the draws."""
    targets = soft_targets(labels, num_classes)
    H, W = images.shape[-2:]
    box = draw_cutmix(H, W, alpha, p, generator, lam, center)
    if box is None:
        return images, targets
    return apply_cutmix(images, targets, box)
