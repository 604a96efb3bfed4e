"""A .beton index written with numpy alone (no FFCV import, no image data): enough for the folder checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dataset_tools import beton_format as bf


def index_only_beton(path: Path, labels: list[int], page_size: int = 1 << 21) -> Path:
    """Header, fields `image` (RGB) and `label` (int), one metadata row per label, an empty allocation table."""
    descs = np.zeros(2, dtype=bf.FIELD_DESC)
    for d, (type_id, name) in zip(descs, [(2, b"image"), (1, b"label")], strict=True):
        d["type_id"] = type_id
        d["name"][: len(name)] = np.frombuffer(name, np.uint8)
    meta = np.zeros(len(labels), dtype=np.dtype([("f0", bf.RGB_IMAGE_META), ("f1", bf.INT_META)], align=True))
    meta["f0"]["width"], meta["f0"]["height"], meta["f1"] = 32, 24, labels
    header = np.zeros(1, dtype=bf.HEADER)
    header["version"], header["num_fields"], header["page_size"] = bf.FORMAT_VERSION, 2, page_size
    header["num_samples"] = len(labels)
    header["alloc_table_ptr"] = bf.HEADER.itemsize + descs.nbytes + meta.nbytes
    path.write_bytes(header.tobytes() + descs.tobytes() + meta.tobytes())
    return path
