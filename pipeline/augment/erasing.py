"""Random erasing (torchvision's RandomErasing draws, per sample, on the whole batch at once).

images: (B, 3, H, W) float, ImageNet-normalised, any memory format (kept). The boxes are drawn on the host from a CPU
generator; the caller moves them to the batch's device (pipeline.contract.to_device: one non-blocking copy).
"""

from __future__ import annotations

import math

import torch

from pipeline.augment.mixing import keep_format, uniform
from pipeline.contract import to_device


def erasing_boxes(
    n: int,
    height: int,
    width: int,
    *,
    p: float,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """(n, 4) int64 CPU boxes (top, left, h, w) as torchvision's RandomErasing.get_params draws them: up to 10 tries
    at an area in `scale` of the image and a log-uniform aspect ratio, kept if h < H and w < W; h = w = 0 means the
    sample is not erased (skipped with probability 1 - p, or no try fitted)."""
    area = height * width
    u = uniform(generator, n, 10, 4)
    erase_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    h = torch.round(torch.sqrt(erase_area * aspect)).long()
    w = torch.round(torch.sqrt(erase_area / aspect)).long()
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    t = first.clamp(min=0)
    bh, bw = h[rows, t], w[rows, t]
    top = (u[rows, t, 2] * (height - bh + 1)).floor().long()
    left = (u[rows, t, 3] * (width - bw + 1)).floor().long()
    erase = (first >= 0) & (uniform(generator, n) < p)
    zero = torch.zeros_like(bh)
    return torch.stack(
        [
            torch.where(erase, top, zero),
            torch.where(erase, left, zero),
            torch.where(erase, bh, zero),
            torch.where(erase, bw, zero),
        ],
        dim=1,
    )


def draw_noise_seed(value: float | str, generator: torch.Generator | None) -> int | None:
    """The seed of the noise fill for value="random" (a device generator draws the noise), else None."""
    if value == "random":
        return int(torch.randint(0, 2**62, (), generator=generator))
    if isinstance(value, str):
        raise ValueError(f"value must be a number or 'random', got {value!r}")
    return None


def apply_erasing(
    images: torch.Tensor, boxes: torch.Tensor, value: float | str = 0.0, noise_seed: int | None = None
) -> torch.Tensor:
    """Set box (top, left, h, w) of each sample (`boxes` (B, 4) on the images' device) to `value` in normalised
    units, or to per-pixel N(0, 1) noise from `noise_seed` for value="random"."""
    B, _, H, W = images.shape
    top, left, h, w = (boxes[:, k].view(B, 1, 1, 1) for k in range(4))
    ys = torch.arange(H, device=images.device).view(1, 1, H, 1)
    xs = torch.arange(W, device=images.device).view(1, 1, 1, W)
    mask = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    if value == "random":
        noise_gen = torch.Generator(device=images.device).manual_seed(noise_seed)
        fill = torch.randn(images.shape, generator=noise_gen, device=images.device, dtype=torch.float32)
        return keep_format(torch.where(mask, fill.to(images.dtype), images), images)
    return keep_format(images.masked_fill(mask, float(value)), images)


def random_erasing(
    images: torch.Tensor,
    *,
    p: float = 0.25,
    scale: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float | str = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per sample, with probability p, one rectangle (torchvision RandomErasing draws) set to `value` in normalised
    units (0 = the ImageNet mean colour, torchvision's default after Normalize) or "random": per-pixel N(0, 1)
    noise (timm's "pixel" mode)."""
    B, _, H, W = images.shape
    boxes = erasing_boxes(B, H, W, p=p, scale=scale, ratio=ratio, generator=generator)
    seed = draw_noise_seed(value, generator)
    return apply_erasing(images, to_device([boxes], images.device)[0], value, seed)
