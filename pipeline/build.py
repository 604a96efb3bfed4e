"""`build_loader`: one call for every backend; `backend="auto"` picks the fastest one the data and machine allow."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

import torch

from dataset_tools.files import DataFolderError, MissingData
from pipeline.contract import Loader, LoaderOptions, Placement, Request, auto_workers
from pipeline.folders import has_beton, has_folder

BACKENDS = ("ffcv", "dali", "torchvision")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def available_backends() -> list[str]:
    """Backends whose packages are installed here (without importing them: ffcv takes ~10 s to import)."""
    found = {"ffcv": _importable("ffcv"), "dali": _importable("nvidia.dali"), "torchvision": _importable("torchvision")}
    return [name for name in BACKENDS if found[name]]


def beton_storage(data_dir: Path, split: str) -> tuple[int, int]:
    """(raw samples, all samples) of `split`.beton, from its index (milliseconds, no ffcv)."""
    from dataset_tools.beton_format import image_column, read_index

    column = image_column(read_index(data_dir / f"{split}.beton"))
    return column.num_raw, len(column.labels)


def choose_backend(data_dir: Path, split: str, device: torch.device) -> tuple[str, str]:
    """(backend, why) for backend="auto".

    Betons: DALI decoding them on the GPU when DALI, a CUDA device and an all-JPEG beton are there (raw samples are
    host copies to DALI, and a mixed beton was made for CPU decoding); else ffcv; else (no ffcv) DALI on whatever
    device there is. Image folders: DALI with a GPU, else torchvision. `why` says why DALI was not chosen when it is
    installed."""
    installed = available_backends()
    beton = has_beton(data_dir, split)
    path = data_dir / f"{split}.beton"
    gpu = device.type == "cuda" and torch.cuda.is_available()
    if beton:
        if "dali" in installed:
            raw, total = beton_storage(data_dir, split)
            if gpu and raw == 0:
                return "dali", f"found {path}, all {total:,} images JPEG: DALI decodes them on the GPU"
            not_dali = (
                f"{path.name} stores {raw:,} of {total:,} images raw (rn50 convert --compress-prob 1 "
                "writes an all-JPEG beton for GPU decoding)"
                if gpu
                else f"device is {device.type}"
                if device.type != "cuda"
                else "no CUDA device"
            )
        else:
            not_dali = "DALI not installed"
        if "ffcv" in installed:
            return "ffcv", f"found {path}; not DALI: {not_dali}"
        if "dali" in installed:
            return "dali", f"found {path}, ffcv not installed: DALI decodes it on the {'GPU' if gpu else 'CPU'}"
    if not has_folder(data_dir, split):
        if beton:
            raise RuntimeError(
                f"{path} needs the ffcv or DALI package, neither is installed (make setup installs "
                "them), and there is no image folder to fall back on"
            )
        raise MissingData(
            f"{data_dir}: neither {split}.beton nor a {split}/ image folder "
            "(rn50 convert writes betons; image folders hold <wnid>/*.JPEG)"
        )
    why = "no .beton" if not beton else "ffcv not installed"
    if "dali" in installed and gpu:
        return "dali", f"{why}; DALI decodes the {split}/ JPEGs on the GPU"
    missing = (
        "DALI not installed"
        if "dali" not in installed
        else f"device is {device.type}"
        if device.type != "cuda"
        else "no CUDA device"
    )
    return "torchvision", f"{why}; {missing}, so PIL decodes {split}/ on the CPU"


# backend -> (module, class): imported only when that backend is built (ffcv takes ~10 s to import)
_CLASSES = {
    "ffcv": ("pipeline.ffcv_loader", "FFCVLoader"),
    "dali": ("pipeline.dali_loader", "DALILoader"),
    "torchvision": ("pipeline.torchvision_loader", "TorchvisionLoader"),
}


def build_loader(
    data_dir: str | Path,
    split: str = "train",
    *,
    batch_size: int = 256,
    resolution: int = 160,
    placement: Placement | None = None,
    options: LoaderOptions | None = None,
    seed: int = 0,
    drop_last: bool = True,
    verbose: bool = True,
) -> Loader:
    """A loader yielding (images (B, 3, R, R) channels_last `placement.dtype` normalised, labels (B,) int64) on
    `placement.device` (default: Placement(), one CUDA process in float16), built as `options` say (default:
    LoaderOptions(), the backend picked by `choose_backend`). See pipeline.contract for both.
    verbose: print the chosen backend (rank 0 only)."""
    data_dir = Path(data_dir)
    placement, options = placement or Placement(), options or LoaderOptions()
    if not data_dir.is_dir():
        what = "a file, not a folder" if data_dir.exists() else "no such folder"
        raise MissingData(f"{data_dir}: {what} (the data dir holds train.beton/val.beton or train/ val/)")
    if not os.access(data_dir, os.R_OK | os.X_OK):  # else every file in it looks missing
        raise DataFolderError(f"{data_dir}: cannot be read (permissions); make it readable for this user")
    backend = options.backend
    if backend == "auto":
        backend, why = choose_backend(data_dir, split, placement.device)
    elif backend in BACKENDS:
        why = "asked for"
    else:
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    request = Request(split, batch_size, resolution, seed, drop_last)
    options = replace(options, backend=backend, workers=auto_workers(options.workers))
    threads = torch.get_num_threads()
    try:
        module, name = _CLASSES[backend]
        loader: Loader = getattr(importlib.import_module(module), name)(data_dir, request, placement, options)
    finally:
        # The one guard of torch's thread count on this thread: FFCV sets it when imported (to 1) and when it builds
        # its loader (to the decoding threads), and the caller's count is the trainer's. (FFCV's epoch thread sets it
        # again: pipeline.ffcv_loader puts it back there.)
        torch.set_num_threads(threads)
    if verbose and placement.rank == 0:
        if backend == "dali" and why == "asked for":
            why += f", from the {loader.source_kind}: {loader.source.describe_storage()}"
        print(f"pipeline: {split} backend {backend} ({why})", flush=True)
    return loader
