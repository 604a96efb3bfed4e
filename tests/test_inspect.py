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
    from ffcv.types import TYPE_ID_HANDLER

    for type_id, handler in TYPE_ID_HANDLER.items():  # every kind FFCV writes, so an extra field is read, not refused
        if handler is None:
            continue
        import torch

        args = {"NDArrayField": (np.dtype("<f4"), (2,)), "TorchTensorField": (torch.float32, (2,))}
        field = handler(*args.get(handler.__name__, ()))
        assert bf.TYPE_IDS[type_id][1] == field.metadata_type, handler.__name__


def test_a_beton_with_an_extra_field_is_read(tmp_path):
    """FFCV's writer with a third field (a per-sample weight): inspect and both beton loaders ignore it."""
    import torch
    from ffcv.fields import FloatField, IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from dataset_tools.inspect_beton import main
    from pipeline import LoaderOptions, Placement, build_loader

    class Dataset:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return np.full((40, 48, 3), 30 * i, np.uint8), i % 2, float(i)

    fields = {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "weight": FloatField()}
    DatasetWriter(str(tmp_path / "train.beton"), fields, num_workers=1).from_indexed_dataset(Dataset())
    assert main([str(tmp_path / "train.beton")]) == 0
    for backend in ("ffcv", "dali"):
        if backend == "dali":
            pytest.importorskip("nvidia.dali")
        loader = build_loader(
            tmp_path,
            "train",
            batch_size=4,
            resolution=32,
            placement=Placement("cpu"),
            options=LoaderOptions(backend),
            verbose=False,
        )
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64


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


def test_unwritable_grid_or_json_is_one_line_before_any_work(coded_betons, tmp_path, capsys, monkeypatch):
    import dataset_tools.inspect_beton as inspect_beton
    from dataset_tools.inspect_beton import main

    (tmp_path / "file.txt").write_text("x")
    drawn = []
    monkeypatch.setattr(inspect_beton, "draw_grid", lambda *a, **k: drawn.append(a))
    for flag in ("--grid", "--json"):
        assert main([str(coded_betons / "train.beton"), flag, str(tmp_path / "file.txt" / "sub" / "x")]) == 2
        captured = capsys.readouterr()
        assert len(captured.err.strip().splitlines()) == 1 and flag in captured.err and "file.txt" in captured.err
        assert captured.out == ""  # refused before the summary
    assert not drawn


def test_grid_full_disk_is_one_line(coded_betons, tmp_path, capsys, monkeypatch):
    import errno

    import matplotlib.figure

    from dataset_tools.inspect_beton import main

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    assert main([str(coded_betons / "train.beton"), "--grid", str(tmp_path / "g.png"), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err and "g.png" in err, err


def test_folder_problems_are_a_warning_and_a_damaged_sample_is_named(coded_betons, tmp_path, capsys):
    import shutil

    from dataset_tools.beton_format import read_index
    from dataset_tools.inspect_beton import main

    out = tmp_path / "b"
    shutil.copytree(coded_betons, out)
    (out / "classes.json").write_text("[not json")
    index = read_index(out / "train.beton")
    jpeg = int(np.flatnonzero(index.metadata["f0"]["mode"] == 0)[0])  # raw pixels would "decode" whatever they are
    with open(out / "train.beton", "r+b") as f:  # the sample's bytes become garbage (its index stays intact)
        f.seek(int(index.metadata["f0"]["data_ptr"][jpeg]))
        f.write(b"\x00" * 64)
    assert main([str(out / "train.beton"), "--grid", str(tmp_path / "g.png"), "--n", "48"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("rn50 inspect: warning")]
    assert len(warnings) == 2, captured.err
    assert "classes.json" in warnings[0] and f"sample {jpeg}:" in warnings[1]
    assert "48 images" in captured.out and (tmp_path / "g.png").is_file()
