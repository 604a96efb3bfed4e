"""Finding and reading the images of an ImageNet-layout folder, the way real downloads are: with odd files in them.

ImageNet itself holds CMYK JPEGs (22 in train, 1 in val), grayscale JPEGs and one PNG named `.JPEG`; copies made by
users add zero-byte files, truncated downloads, `.DS_Store` and `._*` resource forks. `load_rgb` turns every image
it can into RGB uint8 and raises `BadImage` with a short reason for everything else; `scan_split` lists the images of
`ROOT/<split>/<class>/` the way torchvision's ImageFolder orders them (sorted class folders, sorted files).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# torchvision's ImageFolder IMG_EXTENSIONS (matched case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class BadImage(Exception):
    """The file cannot become an RGB image; `str(e)` is the reason shown in reports."""


def is_image_file(name: str) -> bool:
    """Image extension and not hidden (macOS `._x.JPEG` resource forks and dotfiles are not images)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class SplitListing:
    root: Path
    classes: list[str]  # sorted class folder names (the wnids); index = label
    files: list[tuple[str, int]]  # (path, label) in ImageFolder order
    ignored: int  # non-image or hidden entries that were not considered


def list_classes(split_dir: str | Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (ImageFolder's class order)."""
    split_dir = Path(split_dir)
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def scan_split(split_dir: str | Path, classes: list[str] | None = None) -> SplitListing:
    """List the images of `split_dir/<class>/*`. `classes` fixes the label order (e.g. the train split's)."""
    split_dir = Path(split_dir)
    classes = list_classes(split_dir) if classes is None else classes
    files, ignored = [], 0
    for label, wnid in enumerate(classes):
        class_dir = split_dir / wnid
        if not class_dir.is_dir():
            continue
        names = []
        for entry in os.scandir(class_dir):
            if entry.is_file() and is_image_file(entry.name):
                names.append(entry.name)
            else:
                ignored += 1
        files.extend((str(class_dir / name), label) for name in sorted(names))
    return SplitListing(split_dir, classes, files, ignored)


def _to_rgb(im) -> np.ndarray:
    """Any PIL image mode -> RGB uint8 (H, W, 3). Transparent pixels are composited over white."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return np.asarray(im)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grayscale: keep the top 8 bits of the 16-bit range instead of clipping at 255.
        arr = np.asarray(im).astype(np.uint32)
        gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        gray = ((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV, RGBX, ...
    return np.asarray(im.convert("RGB"))


def target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) after shrinking the longer side to `max_side` (never enlarging); FFCV's writer rounds the same way."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    ratio = max_side / max(width, height)
    return max(1, int(ratio * width)), max(1, int(ratio * height))


def load_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """Read `path` as an RGB uint8 array (H, W, 3), the longer side shrunk to `max_side` with area averaging.

    JPEGs much larger than `max_side` are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain first (libjpeg's
    scaled IDCT), which is several times cheaper than a full decode and still leaves >= the target size for the
    area resize. Raises BadImage for empty, truncated, undecodable and non-image files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            tw, th = target_size(width, height, max_side)
            if im.format == "JPEG" and (tw, th) != (width, height):
                im.draft(im.mode, (math.ceil(tw), math.ceil(th)))
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            arr = _to_rgb(im)
    except UnidentifiedImageError:
        raise BadImage("not an image: no decoder recognises its content") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in msg or isinstance(e, EOFError) else "undecodable"
        raise BadImage(f"{kind}: {msg}") from None
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise BadImage(f"undecodable: unexpected pixel array shape {arr.shape}")
    if (arr.shape[1], arr.shape[0]) != (tw, th):
        import cv2

        arr = cv2.resize(np.ascontiguousarray(arr), (tw, th), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(arr)
