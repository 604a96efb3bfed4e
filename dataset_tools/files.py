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


class DataFolderError(ValueError):
    """A data folder (image folders or .beton files) cannot be used as it is; `str(e)` is one line naming the file
    and the fix. Commands print it as their error; the loaders raise it at build time (and the torchvision loader
    when a split has no decodable file)."""


class MissingData(DataFolderError, FileNotFoundError):
    """A split, its class folders or its images are not there: a DataFolderError (one line where commands print
    them) that is also the FileNotFoundError callers of the loaders catch."""


def check_writable(path: str | Path) -> None:
    """Raise OSError (naming the path) unless a file can be written at `path`: its folder is created if missing and
    a probe file is made and removed there. For commands to call before the work whose result goes to `path`."""
    import errno

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = path.parent / f".{path.name}.probe-{os.getpid()}"
    with open(probe, "wb"):
        pass
    probe.unlink()


def scan_folder(folder: str | Path) -> list[os.DirEntry]:
    """os.scandir as a list, with a folder that cannot be listed (permissions, a file in its place, a vanished
    network mount) reported as a DataFolderError naming it."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as e:
        fix = "check its permissions" if isinstance(e, PermissionError) else "check the path"
        raise DataFolderError(f"{folder}: cannot be listed ({e.strerror or e}); {fix}") from None


def is_image_file(name: str) -> bool:
    """Image extension and not hidden (macOS `._x.JPEG` resource forks and dotfiles are not images)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class SplitListing:
    root: Path
    classes: list[str]  # sorted class folder names (the wnids); index = label
    files: list[tuple[str, int]]  # (path, label) in ImageFolder order
    ignored: int  # non-image or hidden entries that were not considered


def skipped_in_report(report: Path) -> set[str]:
    """Resolved paths of the files `rn50 convert` skipped (convert_report.json: {split: {"skipped": [{path}]}})."""
    import json

    report = Path(report)
    if not report.is_file():
        raise FileNotFoundError(f"{report}: no such file (rn50 convert writes convert_report.json in its --out-dir)")
    try:
        data = json.loads(report.read_text())
        return {
            str(Path(item["path"]).resolve())
            for part in data.values()
            if isinstance(part, dict)
            for item in part.get("skipped", [])
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise DataFolderError(
            f"{report}: not a convert_report.json rn50 convert wrote ({type(e).__name__}: {e})"
        ) from None


def list_classes(split_dir: str | Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders (ImageFolder's class order)."""
    split_dir = Path(split_dir)
    return sorted(e.name for e in scan_folder(split_dir) if e.is_dir() and not e.name.startswith("."))


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
        for entry in scan_folder(class_dir):
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


def turbojpeg_decoder():
    """FFCV's ctypes binding of TurboJPEG's tjDecompress2 (scaled decode straight to RGB), or None without ffcv."""
    try:
        from ffcv.libffcv import imdecode
    except ImportError:
        return None
    return imdecode


def _dct_scale(width: int, height: int, tw: int, th: int) -> int:
    """Largest libjpeg power-of-two reduction (8 = none, 4 = 1/2, 2 = 1/4, 1 = 1/8) still >= the target size.
    Only these are SIMD-accelerated in libjpeg-turbo; the other M/8 factors decode slower than a full decode."""
    for eighths in (1, 2, 4):
        if math.ceil(width * eighths / 8) >= tw and math.ceil(height * eighths / 8) >= th:
            return eighths
    return 8


def _decode_turbojpeg(decode, data: bytes, width: int, height: int, tw: int, th: int) -> np.ndarray | None:
    """Decode a YCbCr/grayscale JPEG with TurboJPEG, reduced in the DCT domain when it is much larger than the
    target. None when TurboJPEG reports any error or warning (truncated data, CMYK, ...): the caller then takes
    PIL's path, which either decodes the file or names what is wrong with it."""
    eighths = _dct_scale(width, height, tw, th)
    out = np.empty((math.ceil(height * eighths / 8), math.ceil(width * eighths / 8), 3), dtype=np.uint8)
    src = np.frombuffer(data, dtype=np.uint8)
    if decode(src, out, height, width, height, width, 0, 0, eighths, 8, False, False) != 0:
        return None
    return out


def load_rgb(path: str, max_side: int | None = None, decoder=None) -> np.ndarray:
    """Read `path` as an RGB uint8 array (H, W, 3), the longer side shrunk to `max_side` with area averaging.

    `decoder` (from `turbojpeg_decoder()`) takes ordinary JPEGs through TurboJPEG, about twice as fast as PIL; JPEGs
    much larger than `max_side` are first reduced 1/2, 1/4 or 1/8 in the DCT domain (libjpeg's scaled IDCT: far
    cheaper than a full decode, and still >= the target size for the area resize). Everything else -- PNG, CMYK,
    16-bit, palette, odd or damaged files -- goes through PIL. Raises BadImage for empty, truncated, undecodable
    and non-image files."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise BadImage(f"unreadable: {e.strerror or e}") from None
    if not data:
        raise BadImage("empty file (0 bytes)")
    arr = None
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            width, height = im.size
            tw, th = target_size(width, height, max_side)
            if decoder is not None and im.format == "JPEG" and im.mode in ("RGB", "L"):
                arr = _decode_turbojpeg(decoder, data, width, height, tw, th)
            if arr is None:
                if im.format == "JPEG" and (tw, th) != (width, height):
                    im.draft(im.mode, (tw, th))
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
