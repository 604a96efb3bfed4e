"""Batch augmentations that run wherever the batch is (the GPU in training), shared by every backend.

All functions are pure: they take a batch and return new tensors, and every random draw comes from the explicit
`generator` (a CPU torch.Generator; None uses torch's default one). Draws are made on the CPU, a few numbers per
sample, so choosing which samples get which operation needs no device synchronisation.

Shapes and dtypes:
- images: (B, 3, H, W) float32/float16/bfloat16, ImageNet-normalised (what the loaders yield), any memory format.
  Outputs keep shape, dtype, device and channels_last.
- labels: (B,) int64 class indices, or (B, C) float soft targets. mixup/cutmix return (B, C) float32 soft targets
  whose rows sum to 1.

Semantics follow torchvision (v2 MixUp, CutMix, RandomErasing, TrivialAugmentWide; AutoAugment's IMAGENET policy),
which the tests use as the reference; the difference is that TrivialAugment and AutoAugment here draw an operation and
magnitude per sample for a whole batch at once, instead of per image on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD

# ---------------------------------------------------------------------------------------------------- targets, mixing


def one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int64 -> (B, C) float32, with label smoothing spread over all classes (as CrossEntropyLoss does)."""
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    t = F.one_hot(labels.long(), num_classes).float()
    return t * (1.0 - smoothing) + smoothing / num_classes if smoothing else t


def _soft(labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    if labels.ndim == 2:
        return labels.float()
    if num_classes is None:
        raise ValueError("num_classes is needed to mix integer labels")
    return one_hot(labels, num_classes)


def _uniform(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    # torch's Beta cannot take a generator; a numpy generator seeded from ours keeps the draw reproducible.
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _keep_format(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


def mixup(images: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.2, num_classes: int | None = None,
          p: float = 1.0, generator: torch.Generator | None = None,
          lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (torchvision v2 semantics): each sample is mixed with the previous one in the batch, weight
    lam ~ Beta(alpha, alpha) for the batch. With probability 1 - p the batch passes unchanged (targets one-hot).
    `lam` fixes the weight instead of drawing it."""
    targets = _soft(labels, num_classes)
    if float(_uniform(generator)) >= p:
        return images, targets
    lam = _beta(alpha, generator) if lam is None else float(lam)
    mixed = images.roll(1, 0).mul_(1.0 - lam).add_(images.mul(lam))
    return _keep_format(mixed, images), targets.roll(1, 0).mul_(1.0 - lam).add_(targets.mul(lam))


def cutmix(images: torch.Tensor, labels: torch.Tensor, *, alpha: float = 1.0, num_classes: int | None = None,
           p: float = 1.0, generator: torch.Generator | None = None, lam: float | None = None,
           center: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix (torchvision v2 semantics): a box of area about (1 - lam) of the image, lam ~ Beta(alpha, alpha), centred
    at a uniform pixel (clipped at the borders), is pasted from the previous sample; targets are mixed by the area
    actually pasted. With probability 1 - p the batch passes unchanged. `lam`/`center` (y, x) fix the draws."""
    targets = _soft(labels, num_classes)
    if float(_uniform(generator)) >= p:
        return images, targets
    H, W = images.shape[-2:]
    lam = _beta(alpha, generator) if lam is None else float(lam)
    if center is None:
        cx = int(torch.randint(W, (), generator=generator))
        cy = int(torch.randint(H, (), generator=generator))
    else:
        cy, cx = center
    r = 0.5 * math.sqrt(1.0 - lam)
    rw, rh = int(r * W), int(r * H)
    x1, y1, x2, y2 = max(cx - rw, 0), max(cy - rh, 0), min(cx + rw, W), min(cy + rh, H)
    out = images.clone()
    out[..., y1:y2, x1:x2] = images.roll(1, 0)[..., y1:y2, x1:x2]
    lam_area = 1.0 - (x2 - x1) * (y2 - y1) / (W * H)
    return _keep_format(out, images), targets.roll(1, 0).mul_(1.0 - lam_area).add_(targets.mul(lam_area))


def mixup_or_cutmix(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, mixup_alpha: float = 0.2,
                    cutmix_alpha: float = 1.0, p: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One of MixUp/CutMix per batch, chosen with equal odds (torchvision's reference recipe: RandomChoice of the
    two); an alpha of 0 disables that one. Returns soft targets even when nothing is mixed."""
    choices = [name for name, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
    if not choices or float(_uniform(generator)) >= p:
        return images, _soft(labels, num_classes)
    pick = choices[int(torch.randint(len(choices), (), generator=generator))]
    if pick == "mixup":
        return mixup(images, labels, alpha=mixup_alpha, num_classes=num_classes, generator=generator)
    return cutmix(images, labels, alpha=cutmix_alpha, num_classes=num_classes, generator=generator)


# ---------------------------------------------------------------------------------------------------- random erasing


def erasing_boxes(n: int, height: int, width: int, *, p: float, scale: tuple[float, float],
                  ratio: tuple[float, float], generator: torch.Generator | None) -> torch.Tensor:
    """(n, 4) int64 CPU boxes (top, left, h, w) as torchvision's RandomErasing.get_params draws them: up to 10 tries
    at an area in `scale` of the image and a log-uniform aspect ratio, kept if h < H and w < W; h = w = 0 means the
    sample is not erased (skipped with probability 1 - p, or no try fitted)."""
    area = height * width
    u = _uniform(generator, n, 10, 4)
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
    erase = (first >= 0) & (_uniform(generator, n) < p)
    zero = torch.zeros_like(bh)
    return torch.stack([torch.where(erase, top, zero), torch.where(erase, left, zero),
                        torch.where(erase, bh, zero), torch.where(erase, bw, zero)], dim=1)


def random_erasing(images: torch.Tensor, *, p: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float | str = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per sample, with probability p, one rectangle (torchvision RandomErasing draws) set to `value` in normalised
    units (0 = the ImageNet mean colour, torchvision's default after Normalize) or "random": per-pixel N(0, 1)
    noise (timm's "pixel" mode)."""
    B, _, H, W = images.shape
    boxes = erasing_boxes(B, H, W, p=p, scale=scale, ratio=ratio, generator=generator).to(images.device)
    top, left, h, w = (boxes[:, k].view(B, 1, 1, 1) for k in range(4))
    ys = torch.arange(H, device=images.device).view(1, 1, H, 1)
    xs = torch.arange(W, device=images.device).view(1, 1, 1, W)
    mask = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
    if value == "random":
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        noise_gen = torch.Generator(device=images.device).manual_seed(seed)
        fill = torch.randn(images.shape, generator=noise_gen, device=images.device, dtype=torch.float32)
        fill = fill.to(images.dtype)
    elif isinstance(value, str):
        raise ValueError(f"value must be a number or 'random', got {value!r}")
    else:
        fill = torch.tensor(float(value), dtype=images.dtype, device=images.device)
    return _keep_format(torch.where(mask, fill, images), images)


# --------------------------------------------------------------------------------- per-sample TrivialAugment policy

# name -> (magnitudes over num_bins, signed), exactly torchvision's TrivialAugmentWide._AUGMENTATION_SPACE
def _space(bins: int) -> dict[str, tuple[torch.Tensor | None, bool]]:
    lin = torch.linspace
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.99, bins), True),
        "ShearY": (lin(0.0, 0.99, bins), True),
        "TranslateX": (lin(0.0, 32.0, bins), True),
        "TranslateY": (lin(0.0, 32.0, bins), True),
        "Rotate": (lin(0.0, 135.0, bins), True),
        "Brightness": (lin(0.0, 0.99, bins), True),
        "Color": (lin(0.0, 0.99, bins), True),
        "Contrast": (lin(0.0, 0.99, bins), True),
        "Sharpness": (lin(0.0, 0.99, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 6))).round().int().float(), False),
        "Solarize": (lin(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


TRIVIAL_AUGMENT_OPS = tuple(_space(31))


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised images -> float32 on the 0..255 scale (the domain the colour operations are defined on)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float() * std + mean


def from_pixels(pixels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
    return _keep_format(((pixels - mean) / std).to(like.dtype), like)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * a + (1.0 - f) * b).clamp_(0, 255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(3, 1, 3, 3)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = F.conv2d(x, kernel, groups=3)
    return _blend(x, degenerate, factor)


def posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` bits of each 8-bit value (x & ~(2**(8-bits) - 1))."""
    step = torch.pow(2.0, 8 - bits.float()).view(-1, 1, 1, 1)
    return torch.floor(x.round() / step) * step


def solarize(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 255.0 - x, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), (hi - lo) / 255.0)
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) / scale).clamp_(0, 255)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image and channel, PIL's lookup table (as torchvision's equalize_image)."""
    u8 = x.round().clamp_(0, 255).long()
    flat = u8.flatten(start_dim=-2)  # (B, 3, HW)
    hist = torch.zeros(*flat.shape[:-1], 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat))
    cum = hist.cumsum(-1)
    last = cum.argmax(-1, keepdim=True)  # first index reaching the total = the last non-empty bin
    step = (flat.shape[-1] - hist.gather(-1, last)) // 255
    lut = ((cum[..., :-1] + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], dim=-1)
    out = lut.gather(-1, flat).view_as(u8)
    return torch.where(step.unsqueeze(-1) != 0, out, u8).float()


def inverse_affine_matrices(angle: torch.Tensor, translate: torch.Tensor, shear: torch.Tensor,
                            center: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) output->input pixel maps, torchvision's _get_inverse_affine_matrix (scale 1) for N samples at once.
    angle (N,) degrees, translate/shear/center (N, 2): pixels, degrees, pixels relative to the image centre."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear[:, 0]), torch.deg2rad(shear[:, 1])
    cx, cy = center[:, 0], center[:, 1]
    tx, ty = translate[:, 0], translate[:, 1]
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    return torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)


def warp_affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp with black fill, one (2, 3) inverse matrix per image (torchvision's tensor affine)."""
    B, _, H, W = x.shape
    theta = matrices.to(device=x.device, dtype=torch.float32)
    xs = torch.linspace(-W * 0.5 + 0.5, W * 0.5 - 0.5, W, device=x.device)
    ys = torch.linspace(-H * 0.5 + 0.5, H * 0.5 - 0.5, H, device=x.device)
    base = torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W), torch.ones(H, W, device=x.device)], -1)
    scale = torch.tensor([0.5 * W, 0.5 * H], device=x.device)
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(theta.transpose(1, 2) / scale)
    return F.grid_sample(x, grid.view(B, H, W, 2), mode="nearest", padding_mode="zeros", align_corners=False)


def apply_op(x: torch.Tensor, name: str, magnitude: torch.Tensor) -> torch.Tensor:
    """One TrivialAugment operation on pixels x (N, 3, H, W) 0..255 float32 with per-sample magnitudes (N,), as
    torchvision's _AutoAugmentBase._apply_image_or_video_transform does it for one image."""
    n, (H, W) = x.shape[0], x.shape[-2:]
    m = magnitude.to(device=x.device, dtype=torch.float32)
    zeros2 = torch.zeros(n, 2)
    mc = magnitude.float().cpu()
    if name == "Identity":
        return x
    if name in ("ShearX", "ShearY"):
        deg = torch.rad2deg(torch.atan(mc))
        shear = torch.stack([deg, torch.zeros(n)], 1) if name == "ShearX" else torch.stack([torch.zeros(n), deg], 1)
        corner = torch.tensor([[-W * 0.5, -H * 0.5]]).expand(n, 2)  # shear about the top-left pixel (center=[0, 0])
        return warp_affine(x, inverse_affine_matrices(torch.zeros(n), zeros2, shear, corner))
    if name in ("TranslateX", "TranslateY"):
        t = torch.trunc(mc)  # int(magnitude)
        shift = torch.stack([t, torch.zeros(n)], 1) if name == "TranslateX" else torch.stack([torch.zeros(n), t], 1)
        return warp_affine(x, inverse_affine_matrices(torch.zeros(n), shift, zeros2, zeros2))
    if name == "Rotate":
        return warp_affine(x, inverse_affine_matrices(-mc, zeros2, zeros2, zeros2))
    if name == "Brightness":
        return adjust_brightness(x, 1.0 + m)
    if name == "Color":
        return adjust_saturation(x, 1.0 + m)
    if name == "Contrast":
        return adjust_contrast(x, 1.0 + m)
    if name == "Sharpness":
        return adjust_sharpness(x, 1.0 + m)
    if name == "Posterize":
        return posterize(x, m)
    if name == "Solarize":
        return solarize(x, 255.0 * m)
    if name == "AutoContrast":
        return autocontrast(x)
    if name == "Equalize":
        return equalize(x)
    raise ValueError(f"unknown operation {name!r}; known: {', '.join(TRIVIAL_AUGMENT_OPS)}")


def trivial_augment_params(n: int, *, num_magnitude_bins: int = 31, p: float = 1.0,
                           generator: torch.Generator | None = None) -> tuple[list[str], torch.Tensor]:
    """Per sample: an operation name (uniform over TRIVIAL_AUGMENT_OPS) and its magnitude (uniform bin, random sign
    for signed operations); with probability 1 - p a sample gets Identity."""
    space = _space(num_magnitude_bins)
    names = list(space)
    op = torch.randint(len(names), (n,), generator=generator)
    bins = torch.randint(num_magnitude_bins, (n,), generator=generator)
    sign = torch.where(torch.randint(2, (n,), generator=generator) == 1, -1.0, 1.0)
    keep = _uniform(generator, n) < p
    chosen, mags = [], torch.zeros(n)
    for i in range(n):
        name = names[int(op[i])] if keep[i] else "Identity"
        values, signed = space[name]
        if values is not None:
            mags[i] = float(values[int(bins[i])]) * (float(sign[i]) if signed else 1.0)
        chosen.append(name)
    return chosen, mags


def trivial_augment(images: torch.Tensor, *, num_magnitude_bins: int = 31, p: float = 1.0,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """TrivialAugmentWide per sample on the batch's device: every sample gets one operation at one magnitude
    (torchvision's op set and magnitude ranges, nearest interpolation, black fill). Samples sharing an operation are
    processed together, so a batch costs at most 14 batched operations however large it is."""
    names, mags = trivial_augment_params(images.shape[0], num_magnitude_bins=num_magnitude_bins, p=p,
                                         generator=generator)
    return from_pixels(_grouped_by_op(to_pixels(images), names, mags, apply_op), images)


def _grouped_by_op(x: torch.Tensor, names: list[str], mags: torch.Tensor,
                   op: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sample i becomes op(x[i], names[i], mags[i]) ("Identity": unchanged). The samples sharing an operation go
    through it as one batch: one call per distinct operation, however large the batch."""
    out = x.clone()
    for name in sorted(set(names) - {"Identity"}):
        idx_cpu = torch.tensor([i for i, nm in enumerate(names) if nm == name], dtype=torch.int64)
        idx = idx_cpu.to(x.device)
        out[idx] = op(x[idx], name, mags[idx_cpu])
    return out


# ------------------------------------------------------------------------ per-sample AutoAugment (ImageNet policy)

# torchvision's AutoAugment(AutoAugmentPolicy.IMAGENET): 25 sub-policies of two (operation, probability, magnitude
# bin) steps, from "AutoAugment: Learning Augmentation Strategies from Data" (the reference README's augmentation).
AUTO_AUGMENT_IMAGENET: tuple[tuple[tuple[str, float, int | None], tuple[str, float, int | None]], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def _auto_augment_space(height: int, width: int, bins: int = 10) -> dict[str, tuple[torch.Tensor | None, bool]]:
    """name -> (magnitudes over bins, signed): torchvision's AutoAugment._augmentation_space. Solarize thresholds are
    on the 0..255 scale here, as in torchvision's AutoAugment."""
    lin = torch.linspace
    return {
        "ShearX": (lin(0.0, 0.3, bins), True),
        "ShearY": (lin(0.0, 0.3, bins), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * width, bins), True),
        "TranslateY": (lin(0.0, 150.0 / 331.0 * height, bins), True),
        "Rotate": (lin(0.0, 30.0, bins), True),
        "Brightness": (lin(0.0, 0.9, bins), True),
        "Color": (lin(0.0, 0.9, bins), True),
        "Contrast": (lin(0.0, 0.9, bins), True),
        "Sharpness": (lin(0.0, 0.9, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int()).float(), False),
        "Solarize": (lin(255.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
        "Invert": (None, False),
    }


def auto_augment_params(n: int, height: int, width: int, *, p: float = 1.0,
                        generator: torch.Generator | None = None) -> list[tuple[list[str], torch.Tensor]]:
    """For each of the two steps: (operation name per sample, magnitude per sample). As torchvision's
    AutoAugment.get_params, per sample: a uniform sub-policy, two uniform draws against the steps' probabilities,
    two signs (negative on 0). A step that does not fire, or a sample skipped with probability 1 - p, is "Identity"."""
    space = _auto_augment_space(height, width)
    policy = torch.randint(len(AUTO_AUGMENT_IMAGENET), (n,), generator=generator)
    probs = torch.rand((n, 2), generator=generator)
    signs = torch.randint(2, (n, 2), generator=generator)
    keep = _uniform(generator, n) < p
    steps = []
    for k in range(2):
        names, mags = [], torch.zeros(n)
        for i in range(n):
            name, prob, bin_ = AUTO_AUGMENT_IMAGENET[int(policy[i])][k]
            if not keep[i] or not float(probs[i, k]) <= prob:
                names.append("Identity")
                continue
            values, signed = space[name]
            if values is not None:
                mags[i] = float(values[bin_]) * (-1.0 if signed and int(signs[i, k]) == 0 else 1.0)
            names.append(name)
        steps.append((names, mags))
    return steps


def _apply_auto_augment_op(x: torch.Tensor, name: str, magnitude: torch.Tensor) -> torch.Tensor:
    if name == "Invert":
        return 255.0 - x
    if name == "Solarize":  # threshold already on the 0..255 scale
        return solarize(x, magnitude.to(device=x.device, dtype=torch.float32))
    return apply_op(x, name, magnitude)


def auto_augment(images: torch.Tensor, *, p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """AutoAugment with the ImageNet policy per sample on the batch's device (nearest interpolation, black fill, as
    torchvision's defaults). Each of the two steps processes the samples sharing an operation together: at most 14
    batched operations per step. With probability 1 - p a sample passes unchanged."""
    H, W = images.shape[-2:]
    x = to_pixels(images)
    for names, mags in auto_augment_params(images.shape[0], H, W, p=p, generator=generator):
        x = _grouped_by_op(x, names, mags, _apply_auto_augment_op)
    return from_pixels(x, images)
