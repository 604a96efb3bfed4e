"""The one check of a .beton folder: do train.beton, val.beton and classes.json belong together? And its class list.

Every consumer asks here: `rn50 train`/`eval` before torch is imported (training.preflight), the ffcv loader
(pipeline.folders.beton_classes), `rn50 inspect`. It reads only the betons' index tables, never image data.

    manifest.json   written by rn50 convert: the class list and, per split, the beton's size, sample count, label
                    count and a fingerprint of its metadata table (every sample's label, size, storage mode and place
                    in the file: any other conversion gives another fingerprint).

A folder is accepted when
- it has manifest.json: classes.json equals the manifest's list and each beton is the one the manifest describes.
  rn50 convert writes the manifest first, then the beton, then classes.json, so a conversion killed at any point
  leaves either the previous consistent set or a folder refused here with a line that says to run it again;
- it has classes.json only (an earlier rn50 convert, or names a user wrote for betons of FFCV's own DatasetWriter):
  the labels must run over exactly its names, 0 .. len(classes) - 1;
- it has neither (ffcv-imagenet's betons, written by FFCV's DatasetWriter): the class count is the label field's
  maximum + 1, the classes are named class_0, class_1, ..., and `note` says so and how to name them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_tools.beton_format import BetonFormatError, BetonIndex, read_index
from dataset_tools.files import DataFolderError

MANIFEST_NAME = "manifest.json"
CLASSES_NAME = "classes.json"
SPLITS = ("train", "val")
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class BetonFolder:
    path: Path
    classes: list[str]  # index = label
    source: str  # "manifest" (rn50 convert), "classes.json" (no manifest) or "labels" (no names at all)
    note: str | None  # one line for the user, or None


def fingerprint(index: BetonIndex) -> str:
    """A digest of the metadata table (~30 MB for ImageNet's train split: tens of milliseconds)."""
    return hashlib.blake2b(np.ascontiguousarray(index.metadata).tobytes(), digest_size=16).hexdigest()


def labels_of(index: BetonIndex) -> np.ndarray:
    """The label column as int64; DataFolderError when the beton has no integer field named 'label'."""
    kinds = dict(zip(index.field_names, index.field_kinds))
    if kinds.get("label") != "int" or kinds.get("image") != "rgb_image":
        raise DataFolderError(
            f"{index.path}: fields {index.field_names}, expected an RGB image field 'image' and an "
            "integer field 'label' (as rn50 convert and ffcv-imagenet write them)"
        )
    return index.metadata[f"f{index.field_names.index('label')}"].astype(np.int64)


def split_entry(index: BetonIndex) -> dict:
    """What the manifest records about one beton."""
    labels = labels_of(index)
    return {
        "bytes": index.path.stat().st_size,
        "samples": index.num_samples,
        "labels": int(labels.max()) + 1 if len(labels) else 0,
        "index": fingerprint(index),
    }


def open_index(path: Path) -> BetonIndex:
    try:
        return read_index(path, with_alloc_table=False)
    except BetonFormatError as e:
        raise DataFolderError(f"{e}; copy it again, or re-convert it with rn50 convert") from None
    except OSError as e:
        raise DataFolderError(f"{path}: cannot be read ({e.strerror or e})") from None


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise DataFolderError(f"{path}: cannot be read ({e.strerror or e})") from None
    except ValueError as e:
        raise DataFolderError(f"{path}: not valid JSON ({e}); {what}") from None


def read_classes(path: Path) -> list[str]:
    classes = read_json(path, "it holds the class names as a JSON list, index = label")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataFolderError(f"{path}: expected a non-empty JSON list of class names (index = label)")
    if len(set(classes)) != len(classes):
        dup = next(c for c in classes if classes.count(c) > 1)
        raise DataFolderError(f"{path}: the name {dup!r} appears twice; each label needs its own name")
    return classes


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    data = read_json(path, "rn50 convert writes it; run the conversion again")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("classes"), list)
        or not isinstance(data.get("splits"), dict)
    ):
        raise DataFolderError(f"{path}: not a manifest written by rn50 convert; run the conversion again")
    return data


def check_beton_folder(data_dir: str | Path, splits: tuple[str, ...] | list[str] | None = None) -> BetonFolder:
    """The class list of the betons `splits` (default: the train/val betons the folder has), after checking that
    they and classes.json belong together. Raises DataFolderError with one line naming the file and the fix."""
    folder = Path(data_dir)
    if splits is None:
        splits = [s for s in SPLITS if (folder / f"{s}.beton").is_file()]
        if not splits:
            raise DataFolderError(
                f"{folder}: no train.beton or val.beton (rn50 convert --out-dir {folder} writes them)"
            )
    betons = {s: folder / f"{s}.beton" for s in splits}
    for path in betons.values():
        if not path.is_file():
            raise DataFolderError(f"{path}: missing; write it with rn50 convert --data-dir IMAGENET --out-dir {folder}")
    indexes = {s: open_index(path) for s, path in betons.items()}
    labels = {s: labels_of(index) for s, index in indexes.items()}
    for s, lab in labels.items():
        if len(lab) and lab.min() < 0:
            raise DataFolderError(f"{betons[s]}: negative labels ({int(lab.min())}); labels are class indices 0..N-1")
    top = {s: int(lab.max()) if len(lab) else -1 for s, lab in labels.items()}
    classes_path = folder / CLASSES_NAME
    manifest = read_manifest(folder)

    if manifest is not None:
        again = f"a conversion into {folder} was interrupted, or a file was replaced: run rn50 convert again"
        if not classes_path.is_file():
            raise DataFolderError(
                f"{classes_path}: missing, though {folder / MANIFEST_NAME} lists "
                f"{len(manifest['classes'])} classes; {again}"
            )
        classes = read_classes(classes_path)
        if classes != manifest["classes"]:
            raise DataFolderError(f"{classes_path} does not match {folder / MANIFEST_NAME}; {again}")
        for s, index in indexes.items():
            entry = manifest["splits"].get(s)
            if not isinstance(entry, dict):
                raise DataFolderError(
                    f"{betons[s]}: not from the conversion that wrote {classes_path} (the "
                    f"manifest has no entry for it); re-convert it: rn50 convert --splits {s} ..."
                )
            size = betons[s].stat().st_size
            if size != entry.get("bytes"):
                raise DataFolderError(
                    f"{betons[s]}: {size} bytes, but the conversion wrote {entry.get('bytes')}: "
                    "truncated or replaced since; copy it again, or re-convert it"
                )
            if fingerprint(index) != entry.get("index"):
                raise DataFolderError(
                    f"{betons[s]}: not the file the conversion that wrote {classes_path} wrote; {again}"
                )
        _check_label_range(classes, betons, top, classes_path)
        return BetonFolder(folder, classes, "manifest", None)

    if classes_path.is_file():
        classes = read_classes(classes_path)
        _check_label_range(classes, betons, top, classes_path)
        highest = max(top.values())
        if len(classes) > highest + 1:
            names = " and ".join(p.name for p in betons.values())
            raise DataFolderError(
                f"{classes_path}: {len(classes)} names, but the labels of {names} stop at {highest}: "
                f"a model would get {len(classes)} outputs for {highest + 1} classes; keep the first "
                f"{highest + 1} names there, or re-convert"
            )
        return BetonFolder(folder, classes, "classes.json", None)

    # Betons written by FFCV's own DatasetWriter (ffcv-imagenet): labels, no names.
    if "train" in top and "val" in top and top["val"] > top["train"]:
        raise DataFolderError(
            f"{betons['val']}: labels up to {top['val']}, but {betons['train']} only up to "
            f"{top['train']}: the two were not written with one class list"
        )
    count = max(top.values()) + 1
    if count < 1:
        raise DataFolderError(f"{folder}: the betons hold no samples, so no class list can be read from them")
    classes = [f"class_{i}" for i in range(count)]
    note = (
        f"{folder} has no {CLASSES_NAME} (betons from FFCV's own DatasetWriter?): {count} classes from the label "
        f"field, named class_0 .. class_{count - 1}; to name them, write the names to {classes_path} as a JSON "
        "list (index = label)"
    )
    return BetonFolder(folder, classes, "labels", note)


def _check_label_range(classes: list[str], betons: dict[str, Path], top: dict[str, int], classes_path: Path) -> None:
    for s, highest in top.items():
        if highest >= len(classes):
            raise DataFolderError(
                f"{classes_path}: {len(classes)} names, but {betons[s]} has labels up to {highest}: "
                f"every label needs a name (index = label); write {highest + 1} names there, or "
                "re-convert"
            )
