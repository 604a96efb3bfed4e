"""dataset_tools.beton_folder: classes.json against the betons' labels, manifests, FFCV-written betons, damaged files.

Checked where users meet them: the ffcv loader's class list (pipeline.folders.beton_classes), the preflight of
rn50 train/eval (one line, exit 2, before torch is imported) and build_loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, requires_ffcv

from dataset_tools.beton_folder import check_beton_folder
from dataset_tools.files import DataFolderError
from pipeline.folders import beton_classes
from training.preflight import DataError, dataset_classes


def train_preflight(data: Path, *flags: str) -> subprocess.CompletedProcess:
    """rn50 train's argument and data checks only (torch is never imported when they fail)."""
    probe = (
        "import sys\nfrom training.train import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    rc = e.code\nprint('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', rc)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", probe, "--data-dir", str(data), "--loader", "ffcv", *flags],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.fixture()
def betons(coded_betons, tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(coded_betons, out)
    return out


@requires_ffcv
def test_a_converted_folder_is_accepted_with_its_names(betons):
    folder = check_beton_folder(betons)
    assert folder.source == "manifest" and folder.note is None
    assert folder.classes == [f"n{i:08d}" for i in range(4)] == beton_classes(betons)
    assert dataset_classes(betons, "ffcv") == folder.classes


@requires_ffcv
@pytest.mark.parametrize("names", [3, 5])
def test_classes_json_that_does_not_fit_the_labels_is_refused(betons, names):
    """Fewer names than labels used to crash at the first step; more trained a wrong-sized model silently."""
    (betons / "manifest.json").unlink()  # as left by an earlier rn50 convert, or written by a user
    (betons / "classes.json").write_text(json.dumps([f"n{i:08d}" for i in range(names)]))
    with pytest.raises(DataFolderError, match=f"classes.json: {names} names, but .*labels") as caught:
        beton_classes(betons)
    assert "\n" not in str(caught.value)
    with pytest.raises(DataError, match=f"{names} names"):
        dataset_classes(betons, "ffcv")
    done = train_preflight(betons)
    assert done.stdout.split() == ["NO_TORCH", "2"], done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "classes.json" in done.stderr


@requires_ffcv
def test_a_hand_edited_classes_json_in_a_converted_folder_is_refused(betons):
    (betons / "classes.json").write_text(json.dumps(["a", "b", "c", "d"]))
    with pytest.raises(DataFolderError, match="does not match .*manifest.json"):
        beton_classes(betons)


@requires_ffcv
@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "cut_at_the_end", "replaced"])
def test_damaged_or_replaced_betons_are_one_line_before_torch(betons, coded_betons, damage):
    train = betons / "train.beton"
    data = train.read_bytes()
    if damage == "truncated":
        train.write_bytes(data[: len(data) // 2])
    elif damage == "garbage_header":
        train.write_bytes(b"\x17" * 64 + data[64:])
    elif damage == "cut_at_the_end":
        train.write_bytes(data[:-5])
    else:
        shutil.copyfile(coded_betons / "val.beton", train)
    with pytest.raises(DataFolderError, match="train.beton") as caught:
        beton_classes(betons)
    assert "\n" not in str(caught.value)
    done = train_preflight(betons)
    assert done.stdout.split() == ["NO_TORCH", "2"], done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "train.beton" in done.stderr


@requires_ffcv
def test_damaged_beton_at_loader_build_is_a_value_error(betons):
    from _pipeline_helpers import CPU

    from pipeline import LoaderOptions, build_loader

    (betons / "val.beton").write_bytes((betons / "val.beton").read_bytes()[:1000])
    with pytest.raises(ValueError, match="val.beton") as caught:
        build_loader(
            betons,
            split="val",
            batch_size=4,
            resolution=32,
            placement=CPU,
            options=LoaderOptions("ffcv", workers=1),
            verbose=False,
        )
    assert "\n" not in str(caught.value)


def _ffcv_written(tmp_path: Path, labels: list[int], name: str) -> Path:
    """A beton written by FFCV's own DatasetWriter (what ffcv-imagenet users have): no classes.json, no manifest."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return np.full((24, 32, 3), 40 * labels[i] + 20, np.uint8), labels[i]

    path = tmp_path / name
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()}, num_workers=1)
    writer.from_indexed_dataset(Images(), chunksize=4)
    return path


@requires_ffcv
def test_betons_of_ffcvs_own_writer_load_with_their_label_count(tmp_path, capsys):
    from _pipeline_helpers import CPU

    from pipeline import LoaderOptions, build_loader

    data = tmp_path / "ffcv"
    data.mkdir()
    _ffcv_written(data, [0, 1, 2, 2, 1, 0, 2, 1], "train.beton")
    _ffcv_written(data, [0, 1, 2, 1], "val.beton")
    folder = check_beton_folder(data)
    assert folder.source == "labels" and folder.classes == ["class_0", "class_1", "class_2"]
    assert "no classes.json" in folder.note and "JSON list" in folder.note
    assert dataset_classes(data, "ffcv") == folder.classes
    assert capsys.readouterr().err.count("note:") == 1
    loader = build_loader(
        data,
        split="val",
        batch_size=2,
        resolution=16,
        placement=CPU,
        options=LoaderOptions("ffcv", workers=1),
        verbose=False,
    )
    assert loader.num_classes == 3 and loader.classes == folder.classes
    # the user names them: a JSON list beside the betons
    (data / "classes.json").write_text(json.dumps(["cat", "dog", "eel"]))
    assert beton_classes(data) == ["cat", "dog", "eel"]
    from training.config import TrainConfig
    from training.preflight import check_data

    assert check_data(TrainConfig(data_dir=str(data), loader="ffcv", num_classes=3)) == 3


@requires_ffcv
def test_val_with_labels_train_lacks_is_refused_without_names(tmp_path):
    data = tmp_path / "ffcv"
    data.mkdir()
    _ffcv_written(data, [0, 1, 0, 1], "train.beton")
    _ffcv_written(data, [0, 1, 2, 2], "val.beton")
    with pytest.raises(DataFolderError, match="val.beton: labels up to 2, but .*train.beton only up to 1"):
        check_beton_folder(data)
