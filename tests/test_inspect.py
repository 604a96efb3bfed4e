"""rn50 inspect and the numpy reader of the .beton index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CODED_CLASSES, CODED_TRAIN_PER_CLASS, coded_value, decode_beton, requires_ffcv
from PIL import Image

pytestmark = requires_ffcv


def test_format_constants_match_ffcv():
    """beton_format mirrors ffcv.types without importing ffcv; a format change in ffcv must fail here."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_metadata_type

    from dataset_tools import beton_format as bf

    assert bf.FORMAT_VERSION == CURRENT_VERSION
    assert bf.HEADER == HeaderType and bf.FIELD_DESC == FieldDescType and bf.ALLOC_TABLE == ALLOC_TABLE_TYPE
    assert bf.RGB_IMAGE_META == RGBImageField().metadata_type and bf.INT_META == IntField().metadata_type
    ours = np.dtype([("f0", bf.RGB_IMAGE_META), ("f1", bf.INT_META)], align=True)
    assert ours == get_metadata_type([RGBImageField(), IntField()])


def test_summary_and_pixels(coded_betons):
    from dataset_tools.inspect_beton import open_beton, summarize

    s = summarize(open_beton(coded_betons / "train.beton"))
    assert s["samples"] == CODED_CLASSES * CODED_TRAIN_PER_CLASS
    assert s["label_histogram"] == [CODED_TRAIN_PER_CLASS] * CODED_CLASSES
    assert s["width"]["min"] == 80 and s["width"]["max"] == 96
    assert sum(s["storage"].values()) == s["samples"]
    images, labels = decode_beton(coded_betons / "train.beton")
    for i, (image, label) in enumerate(zip(images, labels)):
        r, g, _ = coded_value(int(label), i % CODED_TRAIN_PER_CLASS)
        assert abs(float(image[..., 0].mean()) - r) < 3 and abs(float(image[..., 1].mean()) - g) < 3


def test_cli_grid_and_json(coded_betons, tmp_path, capsys):
    from dataset_tools.inspect_beton import main

    grid, js = tmp_path / "grid.png", tmp_path / "summary.json"
    assert main([str(coded_betons / "train.beton"), "--grid", str(grid), "--json", str(js), "--n", "6"]) == 0
    out = capsys.readouterr().out
    assert f"{CODED_CLASSES * CODED_TRAIN_PER_CLASS} images, {CODED_CLASSES} classes present" in out
    assert "n00000000" in out  # class names from classes.json
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.size[0] > 200
    assert json.loads(js.read_text())["samples"] == CODED_CLASSES * CODED_TRAIN_PER_CLASS


@pytest.mark.parametrize("content", [b"", b"not a beton at all" * 10])
def test_not_a_beton_fails_clearly(tmp_path, capsys, content):
    from dataset_tools.inspect_beton import main

    bad = tmp_path / "x.beton"
    bad.write_bytes(content)
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and len(err.strip().splitlines()) == 1
    assert main([str(tmp_path / "missing.beton")]) == 2
