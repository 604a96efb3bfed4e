"""The image operations of TrivialAugment and AutoAugment, on N images at once with N magnitudes.

x: (N, 3, H, W) float32 pixels on the 0..255 scale, any device; magnitude: (N,) float32 on the same device, in
torchvision's units. Each operation is torchvision's (tensor functional, nearest interpolation, black fill) applied per
image; the tests compare them op by op. Magnitudes stay on the device: nothing here reads a device value on the host
or copies from the host, so a batch is augmented without waiting for the GPU.

`TRIVIAL_OPS` and `AUTO_AUGMENT_OPS` map an operation's name to `f(x, magnitude)`: the two policies use the same
operations, except that AutoAugment's Solarize threshold is already on the 0..255 scale and it adds Invert.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------- colour


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
    # PIL's smoothing kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, made on the device: `kernel[1, 1] = 5.0` would
    # copy the 5 from the host and wait for the GPU (the H200's sync check caught it)
    centre = F.pad(torch.full((1, 1), 4.0, device=x.device), (1, 1, 1, 1))
    kernel = ((torch.ones(3, 3, device=x.device) + centre) / 13.0).expand(3, 1, 3, 3)
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


# ---------------------------------------------------------------------------------------------------- geometry


def inverse_affine_matrices(
    angle: torch.Tensor, translate: torch.Tensor, shear: torch.Tensor, center: torch.Tensor
) -> torch.Tensor:
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
    xs = torch.linspace(-W * 0.5 + 0.5, W * 0.5 - 0.5, W, device=x.device)
    ys = torch.linspace(-H * 0.5 + 0.5, H * 0.5 - 0.5, H, device=x.device)
    base = torch.stack([xs.view(1, W).expand(H, W), ys.view(H, 1).expand(H, W), torch.ones(H, W, device=x.device)], -1)
    # pixels -> grid_sample's [-1, 1], scaling the matrix first as torchvision does (nearest sampling is decided by
    # the last bit at ties); column by column, since a (2,) tensor of the factors would be a host-to-device copy
    theta = matrices.float().transpose(1, 2)
    theta = torch.stack([theta[..., 0] / (0.5 * W), theta[..., 1] / (0.5 * H)], -1)
    grid = base.view(1, H * W, 3).expand(B, -1, -1).bmm(theta)
    return F.grid_sample(x, grid.view(B, H, W, 2), mode="nearest", padding_mode="zeros", align_corners=False)


def _affine(
    x: torch.Tensor,
    angle: torch.Tensor | None = None,
    translate: torch.Tensor | None = None,
    shear: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    zeros = torch.zeros(x.shape[0], 2, device=x.device)
    angle = torch.zeros(x.shape[0], device=x.device) if angle is None else angle
    pick = [zeros if t is None else t for t in (translate, shear, center)]
    return warp_affine(x, inverse_affine_matrices(angle, *pick))


def _pair(first: torch.Tensor, axis: int) -> torch.Tensor:
    """(N,) -> (N, 2) with the values in column `axis` and zeros in the other."""
    zero = torch.zeros_like(first)
    return torch.stack([first, zero] if axis == 0 else [zero, first], 1)


def shear(x: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    """Shear by atan(magnitude) about the top-left pixel (torchvision's center=[0, 0])."""
    H, W = x.shape[-2:]
    corner = torch.stack([torch.full_like(magnitude, -W * 0.5), torch.full_like(magnitude, -H * 0.5)], 1)
    return _affine(x, shear=_pair(torch.rad2deg(torch.atan(magnitude)), axis), center=corner)


def translate(x: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    return _affine(x, translate=_pair(torch.trunc(magnitude), axis))  # torchvision: int(magnitude) pixels


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    return _affine(x, angle=-degrees)


# ---------------------------------------------------------------------------------------------------- the tables

Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

TRIVIAL_OPS: dict[str, Op] = {
    "Identity": lambda x, m: x,
    "ShearX": lambda x, m: shear(x, m, 0),
    "ShearY": lambda x, m: shear(x, m, 1),
    "TranslateX": lambda x, m: translate(x, m, 0),
    "TranslateY": lambda x, m: translate(x, m, 1),
    "Rotate": rotate,
    "Brightness": lambda x, m: adjust_brightness(x, 1.0 + m),
    "Color": lambda x, m: adjust_saturation(x, 1.0 + m),
    "Contrast": lambda x, m: adjust_contrast(x, 1.0 + m),
    "Sharpness": lambda x, m: adjust_sharpness(x, 1.0 + m),
    "Posterize": posterize,
    "Solarize": lambda x, m: solarize(x, 255.0 * m),  # TrivialAugmentWide's threshold is a share of the range
    "AutoContrast": lambda x, m: autocontrast(x),
    "Equalize": lambda x, m: equalize(x),
}

AUTO_AUGMENT_OPS: dict[str, Op] = {
    **TRIVIAL_OPS,
    "Solarize": solarize,  # AutoAugment's thresholds are on the 0..255 scale already
    "Invert": lambda x, m: 255.0 - x,
}


def apply_op(x: torch.Tensor, name: str, magnitude: torch.Tensor, ops: dict[str, Op] = TRIVIAL_OPS) -> torch.Tensor:
    """Operation `name` of table `ops` on pixels x with per-sample magnitudes (moved to x's device if needed)."""
    if name not in ops:
        raise ValueError(f"unknown operation {name!r}; known: {', '.join(ops)}")
    return ops[name](x, magnitude.to(device=x.device, dtype=torch.float32))
