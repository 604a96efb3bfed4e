"""Reading the layout of a data directory: image folders or .beton files, and the class list (index = label)."""

from __future__ import annotations

from pathlib import Path

from dataset_tools.files import MissingData, list_classes, scan_split, skipped_in_report


def folder_classes(data_dir: Path, split: str) -> list[str]:
    """Sorted wnid folder names of train/ when it exists (so val labels mean the same thing), else of `split`/."""
    reference = data_dir / "train" if (data_dir / "train").is_dir() else data_dir / split
    classes = list_classes(reference) if reference.is_dir() else []
    if not classes:
        raise MissingData(
            f"{reference}: no class folders; expected {reference}/<wnid>/*.JPEG "
            "(a flat val folder? sort it first: rn50 organize-val)"
        )
    return classes


def folder_listing(
    data_dir: Path, split: str, exclude: set[str] | None = None
) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) in ImageFolder order, leaving out the resolved paths in `exclude`."""
    split_dir = data_dir / split
    if not split_dir.is_dir():
        raise MissingData(f"{split_dir}: no such folder; --data-dir must hold {split}/<wnid>/*.JPEG")
    classes = folder_classes(data_dir, split)
    listing = scan_split(split_dir, classes)
    files = listing.files
    if exclude:
        files = [(p, label) for p, label in files if str(Path(p).resolve()) not in exclude]
    if not files:
        raise MissingData(f"{split_dir}: no images in its class folders (extensions: .JPEG .jpg .png ...)")
    return classes, files


def loader_listing(
    data_dir: str | Path, split: str, skip_listed_in: str | Path | None
) -> tuple[list[str], list[tuple[str, int]]]:
    """folder_listing for the folder backends, leaving out what convert_report.json `skip_listed_in` lists as faulty
    (DALI cannot skip a corrupt file by itself; PIL would raise mid-epoch)."""
    exclude = skipped_in_report(Path(skip_listed_in)) if skip_listed_in else set()
    return folder_listing(Path(data_dir), split, exclude)


def beton_classes(data_dir: Path, splits: list[str] | None = None) -> list[str]:
    """The class list (index = label) of a .beton folder, after checking that its betons and classes.json belong
    together (dataset_tools.beton_folder: the one place every backend and command asks). Raises DataFolderError
    (a ValueError) with one line naming the file and the fix."""
    from dataset_tools.beton_folder import check_beton_folder

    return check_beton_folder(data_dir, splits).classes


def has_beton(data_dir: Path, split: str) -> bool:
    return (data_dir / f"{split}.beton").is_file()


def has_folder(data_dir: Path, split: str) -> bool:
    return (data_dir / split).is_dir()
