"""Checks that run before torch is imported, so a wrong path or class count fails in well under a second.

They read only the folder layout (class folder names and whether they can be listed) and, for betons, their index
tables and classes.json (dataset_tools.beton_folder: damaged, mismatched or half-replaced betons), never images.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from dataset_tools.beton_folder import check_beton_folder
from dataset_tools.files import DataFolderError, list_classes, skipped_in_report
from dataset_tools.processes import workers_problem
from training.config import TrainConfig


class DataError(ValueError):
    """The data folder cannot feed this run; the message names the path and the fix."""


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ModuleNotFoundError, ValueError):
        return False


def dataset_classes(
    data_dir: str | Path, loader: str = "auto", splits: tuple[str, ...] = ("train", "val")
) -> list[str]:
    """The class list (index = label) the chosen loader will see for `splits`, from the layout alone."""
    try:
        return _dataset_classes(data_dir, loader, splits)
    except DataFolderError as e:
        raise DataError(str(e)) from None
    except OSError as e:  # a folder that cannot be listed or read (permissions, a vanished mount)
        raise DataError(
            f"{e.filename or data_dir}: cannot be read ({e.strerror or e}); check its permissions"
        ) from None


def _dataset_classes(data_dir: str | Path, loader: str, splits: tuple[str, ...]) -> list[str]:
    d = Path(data_dir)
    if not str(data_dir):
        raise DataError("--data-dir is required (a folder with train.beton/val.beton, or train/ and val/)")
    if not d.is_dir():
        what = "a file, not a folder" if d.exists() else "no such folder"
        raise DataError(f"--data-dir {d}: {what} (it holds train.beton/val.beton, or train/ and val/)")
    if not os.access(d, os.R_OK | os.X_OK):
        raise DataError(f"--data-dir {d}: cannot be read (permissions); make it readable for this user")
    betons = all((d / f"{s}.beton").is_file() for s in splits)
    folders = all((d / s).is_dir() for s in splits)
    wanted = " and ".join(f"{s}.beton" for s in splits)
    # betons feed ffcv, and DALI too (it reads them when they are there); auto reads them if either is installed
    readers = _installed("ffcv") or _installed("nvidia.dali")
    if loader == "ffcv" or (loader == "dali" and betons) or (loader == "auto" and betons and readers):
        if not betons:
            raise DataError(
                f"--data-dir {d}: --loader ffcv needs {wanted} there "
                f"(rn50 convert --data-dir IMAGENET --out-dir {d} writes them)"
            )
        folder = check_beton_folder(d, splits)
        if folder.note and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: {folder.note}", file=sys.stderr, flush=True)
        return folder.classes
    if not folders:
        found = sorted(p.name for p in d.iterdir())[:8]
        raise DataError(
            f"--data-dir {d}: expected {' and '.join(s + '/' for s in splits)} class folders"
            + (f" or {wanted}" if loader == "auto" else "")
            + f"; found {found or 'nothing'}"
        )
    # Labels follow train/'s sorted class folders when it exists (as the loaders do), so val/ must not add classes.
    reference = d / "train" if (d / "train").is_dir() else d / splits[0]
    classes = list_classes(reference)
    if not classes:
        raise DataError(f"{reference}: no class folders (expected {reference.name}/<wnid>/*.JPEG)")
    for s in splits:
        found = list_classes(d / s)
        if not found:
            raise DataError(
                f"{d / s}: no class folders"
                + ("; a flat ILSVRC2012 val folder is sorted by rn50 organize-val" if s == "val" else "")
            )
        stray = sorted(set(found) - set(classes))
        if stray:
            raise DataError(
                f"{d / s}: classes {stray[:5]} are not in {reference.name}/ ({len(stray)} in all); "
                "the splits must share one class list"
            )
        for wnid in found:  # one access() per class folder: cheap, and the loader would fail on it after set-up
            if not os.access(d / s / wnid, os.R_OK | os.X_OK):
                raise DataError(
                    f"{d / s / wnid}: cannot be read (permissions); make it readable, or move it out of {d / s}"
                )
    return classes


def check_data(cfg: TrainConfig) -> int:
    """Number of classes; raises DataError when the layout or the class count does not fit the config, or the
    worker count this machine (a preset may be written for a bigger one)."""
    if workers_problem(cfg.workers):
        raise DataError(workers_problem(cfg.workers))
    if cfg.skip_listed_in and not Path(cfg.skip_listed_in).is_file():
        raise DataError(
            f"--skip-listed-in {cfg.skip_listed_in}: no such file (rn50 convert writes "
            "convert_report.json in its --out-dir)"
        )
    if cfg.skip_listed_in:
        try:
            skipped_in_report(Path(cfg.skip_listed_in))
        except DataFolderError as e:
            raise DataError(f"--skip-listed-in {e}") from None
    classes = dataset_classes(cfg.data_dir, cfg.loader)
    if cfg.num_classes and cfg.num_classes != len(classes):
        raise DataError(
            f"--data-dir {cfg.data_dir} has {len(classes)} classes but the config expects "
            f"--num-classes {cfg.num_classes}; pass --num-classes {len(classes)} (or 0 to take it from "
            "the data), or point --data-dir at the right dataset"
        )
    return len(classes)


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def page_cache_advice(cfg: TrainConfig, ram_bytes: int | None = None) -> str | None:
    """One line of advice when a loader would map betons that cannot stay in the page cache: every epoch then reads
    most of the file from disk again, in random order. ffcv has a way out (its process cache); DALI reads the mapped
    file, so there the way out is a smaller beton. None when there is nothing to say."""
    d = Path(cfg.data_dir)
    betons = [d / f"{s}.beton" for s in ("train", "val")]
    ffcv = cfg.loader in ("auto", "ffcv") and cfg.os_cache
    if not (ffcv or cfg.loader == "dali") or not betons[0].is_file():
        return None
    size = sum(b.stat().st_size for b in betons if b.is_file())
    ram = physical_memory_bytes() if ram_bytes is None else ram_bytes
    if size <= 0.8 * ram:
        return None
    gib = 1024**3
    smaller = (
        "rn50 convert --compress-prob 1 stores every image as JPEG, about a third of the default's size: "
        "FFCV's table gives 65 GB for ImageNet's train set at 512 px, against 202 GB half raw"
    )
    head = (
        f"note: the betons in {d} ({size / gib:.0f} GiB) do not fit in this machine's RAM ({ram / gib:.0f} GiB): "
        "each epoch reads them from disk again. "
    )
    if not ffcv:
        return head + f"DALI reads the mapped file: re-convert smaller ({smaller})"
    return head + (
        "--no-os-cache --loader-order quasi_random reads only the pages coming batches need (or re-convert "
        f"smaller: {smaller})"
    )
