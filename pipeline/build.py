"""`build_loader`: one call for every backend; `backend="auto"` picks the fastest one the data and machine allow."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from dataset_tools.files import DataFolderError
from pipeline.contract import VAL_CROP_RATIO, Loader
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
        raise FileNotFoundError(
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


def auto_workers(workers: int) -> int:
    """workers < 0 ("auto"): this rank's share of the cores it may run on (LOCAL_WORLD_SIZE ranks per machine, set by
    torchrun), minus one left to the training process itself (its Python loop, the kernel launches, the thread that
    feeds the decoders); at least 1. Otherwise `workers` as given."""
    if workers >= 0:
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)


def build_loader(
    data_dir: str | Path,
    split: str = "train",
    backend: str = "auto",
    batch_size: int = 256,
    resolution: int = 160,
    workers: int = -1,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.float16,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool = True,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    val_crop_ratio: float = VAL_CROP_RATIO,
    os_cache: bool = True,
    order: str = "random",
    hw_decoder_load: float | None = None,
    dali_threads: int = 0,
    dali_prefetch: int = 0,
    nvjpeg_padding_mb: int | None = None,
    dali_source: str = "auto",
    skip_listed_in: str | Path | None = None,
    verbose: bool = True,
) -> Loader:
    """A loader yielding (images (B, 3, R, R) channels_last `dtype` normalised, labels (B,) int64) on `device`.

    scale/ratio: RandomResizedCrop ranges (train). val_crop_ratio: centre crop side / shorter side (val).
    os_cache, order: ffcv only (see pipeline.ffcv_loader). dali only (see pipeline.dali_tuning; None/0/negative:
    the GPU kind's default): hw_decoder_load (share of JPEGs sent to the A100/H100/H200 hardware decoder),
    dali_threads, dali_prefetch (batches queued ahead), nvjpeg_padding_mb (nvJPEG's device and host buffers);
    dali_source: "beton" (`split`.beton), "folder" (`split`/<wnid>/) or "auto" (the beton when there is one).
    skip_listed_in: a convert_report.json whose skipped (undecodable) files the folder backends leave out, so they
    see the samples the beton has and DALI does not stop on them.
    verbose: print the chosen backend (rank 0 only)."""
    data_dir = Path(data_dir)
    device = torch.device(device)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such folder (the data dir holds train.beton/val.beton or train/ val/)")
    if not os.access(data_dir, os.R_OK | os.X_OK):  # else every file in it looks missing
        raise DataFolderError(f"{data_dir}: cannot be read (permissions); make it readable for this user")
    if backend == "auto":
        backend, why = choose_backend(data_dir, split, device)
    elif backend in BACKENDS:
        why = "asked for"
    else:
        raise ValueError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    common = dict(
        split=split,
        batch_size=batch_size,
        resolution=resolution,
        workers=auto_workers(workers),
        device=device,
        dtype=dtype,
        rank=rank,
        world_size=world_size,
        seed=seed,
        drop_last=drop_last,
    )
    if backend == "torchvision":
        from pipeline.torchvision_loader import TorchvisionLoader

        loader: Loader = TorchvisionLoader(
            data_dir, scale=scale, ratio=ratio, val_crop_ratio=val_crop_ratio, skip_listed_in=skip_listed_in, **common
        )
    elif backend == "ffcv":
        threads = torch.get_num_threads()
        from pipeline.ffcv_loader import FFCVLoader  # importing ffcv sets torch's thread count to 1: put it back

        torch.set_num_threads(threads)
        loader = FFCVLoader(
            data_dir, scale=scale, ratio=ratio, val_crop_ratio=val_crop_ratio, os_cache=os_cache, order=order, **common
        )
    else:
        from pipeline.dali_loader import DALILoader

        loader = DALILoader(
            data_dir,
            scale=scale,
            ratio=ratio,
            val_crop_ratio=val_crop_ratio,
            hw_decoder_load=hw_decoder_load,
            dali_threads=dali_threads,
            dali_prefetch=dali_prefetch,
            nvjpeg_padding_mb=nvjpeg_padding_mb,
            skip_listed_in=skip_listed_in,
            source=dali_source,
            **common,
        )
    if verbose and rank == 0:
        if backend == "dali" and why == "asked for":
            why += f", from the {loader.source_kind}: {loader.source.describe_storage()}"
        print(f"pipeline: {split} backend {backend} ({why})", flush=True)
    return loader
