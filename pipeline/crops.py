"""Crop boxes for RandomResizedCrop/flip and the validation centre crop, as pure functions of (seed, epoch, index).

Stock FFCV draws its crops from numba's unseeded per-thread np.random, and torchvision from the global torch RNG, so
neither can replay an epoch. Here every sample gets a 64-bit key from (seed, epoch, dataset index) and its random
numbers are the splitmix64 stream started at that key: no state, no threads to agree with, identical on every
backend. The ffcv and torchvision backends both call `random_resized_crop_boxes`, so the same (seed, epoch, index)
and image size give the same box and flip there.

Boxes are (top, left, height, width) in pixels of the stored image, int64 arrays.
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1

ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params
FLIP_DRAW = 4 * ATTEMPTS  # index of the flip draw in a sample's stream
NUM_DRAWS = FLIP_DRAW + 1


def _fmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function (a bijection on uint64)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, epoch: int, indices) -> np.ndarray:
    """One uint64 key per dataset index; different (seed, epoch, index) give unrelated streams."""
    with np.errstate(over="ignore"):
        s = _fmix(np.array([int(seed) & _MASK], dtype=np.uint64) + _GOLDEN)
        e = _fmix(s ^ (np.array([int(epoch) & _MASK], dtype=np.uint64) + _GOLDEN))
        idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
        return _fmix(e ^ (idx + _GOLDEN))


def uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) float64 in [0, 1): the first n outputs of splitmix64 seeded with each key."""
    keys = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        steps = (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)[None, :]
        bits = _fmix(keys[:, None] + steps)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def random_resized_crop_boxes(
    heights, widths, keys, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's RandomResizedCrop.get_params, vectorised, with draws from each sample's key.

    Returns (boxes (N, 4) int64 [top, left, h, w], flips (N,) bool). Up to 10 tries at an area in `scale` of the image
    and a log-uniform aspect ratio in `ratio`; if none fits, the centre crop clamped to `ratio` (same fallback)."""
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    u = uniforms(keys, NUM_DRAWS)
    n = len(H)
    top, left = np.zeros(n, np.int64), np.zeros(n, np.int64)
    h, w = np.zeros(n, np.int64), np.zeros(n, np.int64)
    found = np.zeros(n, bool)
    area = (H * W).astype(np.float64)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    todo = np.arange(n)
    for t in range(ATTEMPTS):  # only the samples still without a box (most find one in the first try or two)
        ut = u[todo, 4 * t : 4 * t + 4]
        Ht, Wt = H[todo], W[todo]
        target = area[todo] * (scale[0] + (scale[1] - scale[0]) * ut[:, 0])
        aspect = np.exp(log_r0 + (log_r1 - log_r0) * ut[:, 1])
        cw = np.round(np.sqrt(target * aspect)).astype(np.int64)
        ch = np.round(np.sqrt(target / aspect)).astype(np.int64)
        ok = (cw > 0) & (cw <= Wt) & (ch > 0) & (ch <= Ht)
        hit = todo[ok]
        top[hit] = np.floor(ut[ok, 2] * (Ht[ok] - ch[ok] + 1)).astype(np.int64)
        left[hit] = np.floor(ut[ok, 3] * (Wt[ok] - cw[ok] + 1)).astype(np.int64)
        h[hit], w[hit] = ch[ok], cw[ok]
        found[hit] = True
        todo = todo[~ok]
        if len(todo) == 0:
            break
    if not found.all():
        nf = ~found
        in_ratio = W / np.maximum(H, 1)
        fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
        fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
        fw, fh = fw.astype(np.int64), fh.astype(np.int64)
        h, w = np.where(nf, fh, h), np.where(nf, fw, w)
        top, left = np.where(nf, (H - fh) // 2, top), np.where(nf, (W - fw) // 2, left)
    flips = u[:, FLIP_DRAW] < 0.5
    return np.stack([top, left, h, w], axis=1), flips


def center_crop_boxes(heights, widths, ratio: float = 224 / 256) -> np.ndarray:
    """The centre square of side int(ratio * shorter side), as FFCV's CenterCropRGBImageDecoder cuts it; resizing
    it to R equals torchvision's Resize(R / ratio) + CenterCrop(R) up to rounding."""
    H = np.asarray(heights, dtype=np.int64)
    W = np.asarray(widths, dtype=np.int64)
    c = np.maximum((ratio * np.minimum(H, W)).astype(np.int64), 1)
    return np.stack([(H - c) // 2, (W - c) // 2, c, c], axis=1)
