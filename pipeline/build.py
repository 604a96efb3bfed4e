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


def choose_backend(data_dir: Path, split: str, device: torch.device) -> tuple[str, str]:
    """(backend, why) for backend="auto": betons -> ffcv; else DALI importable and a GPU -> dali; else torchvision."""
    installed = available_backends()
    beton = has_beton(data_dir, split)
    if beton and "ffcv" in installed:
        return "ffcv", f"found {data_dir / (split + '.beton')}"
    if not has_folder(data_dir, split):
        if beton:
            raise RuntimeError(f"{data_dir / (split + '.beton')} needs the ffcv package, which is not installed "
                               "(make setup installs it), and there is no image folder to fall back on")
        raise FileNotFoundError(f"{data_dir}: neither {split}.beton nor a {split}/ image folder "
                                "(rn50 convert writes betons; image folders hold <wnid>/*.JPEG)")
    why = "no .beton" if not beton else "ffcv not installed"
    if "dali" in installed and device.type == "cuda" and torch.cuda.is_available():
        return "dali", f"{why}; DALI decodes the {split}/ JPEGs on the GPU"
    missing = ("DALI not installed" if "dali" not in installed else
               f"device is {device.type}" if device.type != "cuda" else "no CUDA device")
    return "torchvision", f"{why}; {missing}, so PIL decodes {split}/ on the CPU"


def build_loader(data_dir: str | Path, split: str = "train", backend: str = "auto", batch_size: int = 256,
                 resolution: int = 160, workers: int = 8, device: str | torch.device = "cuda",
                 dtype: torch.dtype = torch.float16, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True, *, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), val_crop_ratio: float = VAL_CROP_RATIO,
                 os_cache: bool = True, order: str = "random", hw_decoder_load: float = 0.65,
                 skip_listed_in: str | Path | None = None, verbose: bool = True) -> Loader:
    """A loader yielding (images (B, 3, R, R) channels_last `dtype` normalised, labels (B,) int64) on `device`.

    scale/ratio: RandomResizedCrop ranges (train). val_crop_ratio: centre crop side / shorter side (val).
    os_cache, order: ffcv only (see pipeline.ffcv_loader). hw_decoder_load: dali only (share of JPEGs sent to the
    A100/H100 hardware decoder). skip_listed_in: a convert_report.json whose skipped (undecodable) files the folder
    backends leave out, so they see the samples the beton has and DALI does not stop on them.
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
    common = dict(split=split, batch_size=batch_size, resolution=resolution, workers=workers, device=device,
                  dtype=dtype, rank=rank, world_size=world_size, seed=seed, drop_last=drop_last)
    if backend == "torchvision":
        from pipeline.torchvision_loader import TorchvisionLoader

        loader: Loader = TorchvisionLoader(data_dir, scale=scale, ratio=ratio, val_crop_ratio=val_crop_ratio,
                                           skip_listed_in=skip_listed_in, **common)
    elif backend == "ffcv":
        threads = torch.get_num_threads()
        from pipeline.ffcv_loader import FFCVLoader  # importing ffcv sets torch's thread count to 1: put it back

        torch.set_num_threads(threads)
        loader = FFCVLoader(data_dir, scale=scale, ratio=ratio, val_crop_ratio=val_crop_ratio, os_cache=os_cache,
                            order=order, **common)
    else:
        from pipeline.dali_loader import DALILoader

        loader = DALILoader(data_dir, scale=scale, ratio=ratio, val_crop_ratio=val_crop_ratio,
                            hw_decoder_load=hw_decoder_load, skip_listed_in=skip_listed_in, **common)
    if verbose and rank == 0:
        print(f"pipeline: {split} backend {backend} ({why})", flush=True)
    return loader
