"""The index of an FFCV .beton (format version 2), read with numpy alone.

Importing ffcv costs ~10 s (numba compiles typed containers at import time), which is too much for a tool that only
needs the metadata table. These dtypes mirror `ffcv.types` for every field kind FFCV 1.0 writes; the test suite
checks them against ffcv's own, so a format change cannot go unnoticed.

Layout: header | field descriptors | metadata (one row per sample) | pages of sample data | allocation table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
HEADER = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)
FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
RGB_IMAGE_META = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
INT_META = np.dtype("<i8")
_PTR_SIZE = np.dtype([("ptr", "<u8"), ("size", "<u8")])
# ffcv.types.TYPE_ID_HANDLER and each field's metadata_type: this project reads `image` and `label`; the other kinds
# are parsed so that a beton carrying an extra field (a weight, a caption) is read, its extra columns ignored.
TYPE_IDS = {
    0: ("float", np.dtype("<f8")),
    1: ("int", INT_META),
    2: ("rgb_image", RGB_IMAGE_META),
    3: ("bytes", _PTR_SIZE),
    4: ("ndarray", np.dtype("<u8")),
    5: ("json", _PTR_SIZE),
    6: ("torch_tensor", np.dtype("<u8")),
}
JPEG_MODE, RAW_MODE = 0, 1


class BetonFormatError(ValueError):
    pass


@dataclass(frozen=True)
class BetonIndex:
    path: Path
    num_samples: int
    page_size: int
    field_names: list[str]
    field_kinds: list[str]
    metadata: np.ndarray  # structured, columns f0, f1, ... in field order
    alloc_table: np.ndarray

    def sizes_by_ptr(self) -> dict[int, int]:
        return dict(zip(self.alloc_table["ptr"].tolist(), self.alloc_table["size"].tolist()))


def read_index(path: str | Path, with_alloc_table: bool = True) -> BetonIndex:
    """The header, field list, metadata table and (unless `with_alloc_table` is False: a folder check needs only the
    metadata, and ImageNet's table is another 30 MB) allocation table of a .beton. BetonFormatError names the file
    when it is not a .beton this reader knows, or is truncated."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER.itemsize:
        raise BetonFormatError(f"{path}: {size} bytes, too short for a .beton header")
    header = np.fromfile(path, dtype=HEADER, count=1)[0]
    if int(header["version"]) != FORMAT_VERSION:
        raise BetonFormatError(
            f"{path}: format version {int(header['version'])}, expected {FORMAT_VERSION} "
            "(not a .beton, or written by another FFCV release)"
        )
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    if HEADER.itemsize + num_fields * FIELD_DESC.itemsize > size:
        raise BetonFormatError(f"{path}: truncated or damaged (its header lists {num_fields} fields)")
    descs = np.fromfile(path, dtype=FIELD_DESC, count=num_fields, offset=HEADER.itemsize)
    names, kinds, dtypes = [], [], []
    for d in descs:
        raw = bytes(d["name"])
        names.append(raw.split(b"\0", 1)[0].decode("ascii", "replace"))
        kind, dtype = TYPE_IDS.get(int(d["type_id"]), (None, None))
        if kind is None:
            raise BetonFormatError(
                f"{path}: field {names[-1]!r} has type id {int(d['type_id'])}, which FFCV 1.0 does not write "
                "(another FFCV release, or a damaged header?)"
            )
        kinds.append(kind)
        dtypes.append(dtype)
    meta_type = np.dtype([(f"f{i}", t) for i, t in enumerate(dtypes)], align=True)
    meta_offset = HEADER.itemsize + descs.nbytes
    alloc_ptr = int(header["alloc_table_ptr"])
    meta_end = meta_offset + num_samples * meta_type.itemsize
    if meta_end > size or not meta_end <= alloc_ptr <= size or (size - alloc_ptr) % ALLOC_TABLE.itemsize:
        raise BetonFormatError(f"{path}: truncated or damaged (its index does not fit the file's {size} bytes)")
    metadata = np.fromfile(path, dtype=meta_type, count=num_samples, offset=meta_offset)
    alloc = np.fromfile(path, dtype=ALLOC_TABLE, offset=alloc_ptr) if with_alloc_table else np.zeros(0, ALLOC_TABLE)
    if with_alloc_table and len(alloc) and int((alloc["ptr"] + alloc["size"]).max()) > alloc_ptr:
        raise BetonFormatError(f"{path}: damaged (its allocation table points past the sample data)")
    return BetonIndex(path, num_samples, int(header["page_size"]), names, kinds, metadata, alloc)


@dataclass(frozen=True)
class ImageColumn:
    """Where each sample's image lies in the file: what a reader needs to take its bytes without ffcv."""

    modes: np.ndarray  # uint8, JPEG_MODE or RAW_MODE
    heights: np.ndarray  # int64, stored pixels
    widths: np.ndarray  # int64
    ptrs: np.ndarray  # int64 file offset of the image bytes
    sizes: np.ndarray  # int64 byte count (from the allocation table)
    labels: np.ndarray  # int64

    @property
    def num_raw(self) -> int:
        return int((self.modes == RAW_MODE).sum())


def image_column(index: BetonIndex, image: str = "image", label: str = "label") -> ImageColumn:
    """The image field's modes, sizes and byte ranges, and the labels, checked against the allocation table and the
    file's length (a damaged index raises BetonFormatError naming the file and the first bad sample)."""
    names = index.field_names
    if image not in names or label not in names or index.field_kinds[names.index(image)] != "rgb_image":
        raise BetonFormatError(
            f"{index.path}: fields {names}, expected an rgb_image field {image!r} and {label!r} (made by rn50 convert?)"
        )
    meta = index.metadata[f"f{names.index(image)}"]
    ptrs = meta["data_ptr"].astype(np.int64)
    table = index.alloc_table
    order = np.argsort(table["ptr"], kind="stable")
    table_ptrs = table["ptr"][order].astype(np.int64)
    at = np.clip(np.searchsorted(table_ptrs, ptrs), 0, max(len(table_ptrs) - 1, 0))
    found = (table_ptrs[at] == ptrs) if len(table_ptrs) else np.zeros(len(ptrs), bool)
    sizes = table["size"][order][at].astype(np.int64) if len(table_ptrs) else np.zeros(len(ptrs), np.int64)
    modes = meta["mode"].astype(np.uint8)
    heights, widths = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    end = index.path.stat().st_size
    bad = ~found | (ptrs + sizes > end) | (sizes <= 0) | ~np.isin(modes, (JPEG_MODE, RAW_MODE))
    bad |= (modes == RAW_MODE) & (sizes != heights * widths * 3)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise BetonFormatError(
            f"{index.path}: the index of sample {first} (and {int(bad.sum()) - 1} more) does not "
            "match its stored bytes (damaged file? re-convert it with rn50 convert)"
        )
    labels = index.metadata[f"f{names.index(label)}"].astype(np.int64)
    return ImageColumn(modes, heights, widths, ptrs, sizes, labels)
