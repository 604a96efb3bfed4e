"""Shared fixtures: small generated datasets, written once per test session.

- `synth_root`: `rn50 synth` output (photo-like JPEGs), 4 classes, small images so loaders run fast on 2 cores.
- `coded_root`: flat-colour images whose pixels encode (label, index): R = 40 * label + 20, G = 8 * (index % 30) + 8.
  A flat colour survives crops, flips and resizes, so any loader's output can be checked against the label.
- `synth_betons` / `coded_betons`: the same folders converted by `rn50 convert` (train.beton, val.beton, classes.json);
  `coded_betons_jpeg`: all stored as JPEG (--compress-prob 1).

Where each module's tests are (test_<name>.py):
- dataset_tools: synth, organize_val, convert, inspect, checksums, beton_folder, locks, progress
- pipeline: pipeline_contract (every backend), pipeline_ffcv / _dali / _dali_beton / _torchvision, pipeline_order, augment
- training: train_config, schedules, model, step, checkpoint, resume, signals, train_run, ddp, train_scripts, lr_finder,
  show_batch, eval, eval_weights, export
- benchmarks: bench, bench_loader, bench_reference, doctor_storage, gpu_visit (the GPU checks' CPU side)
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Peak size of pytest's temp folder during a full run was 3.0 GB (checkpoints of the trained runs, betons); tests
# that pass delete theirs (tmp_path_retention_policy in pyproject.toml). A full run needs this much free space.
SUITE_DISK_GB = 4.0

CODED_CLASSES = 4
CODED_TRAIN_PER_CLASS = 12
CODED_VAL_PER_CLASS = 4


def coded_value(label: int, index: int) -> tuple[int, int, int]:
    return 40 * label + 20, 8 * (index % 30) + 8, 128


def make_coded_dataset(
    root: Path,
    classes: int = CODED_CLASSES,
    train_per_class: int = CODED_TRAIN_PER_CLASS,
    val_per_class: int = CODED_VAL_PER_CLASS,
    size: tuple[int, int] = (96, 80),
) -> Path:
    """ImageNet layout; wnids n0000000<label> so sorted order == label. Returns root."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            d = root / split / f"n{label:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = size if i % 2 == 0 else (size[1], size[0])  # both orientations
                Image.new("RGB", (w, h), coded_value(label, i)).save(d / f"img_{i:04d}.JPEG", quality=95)
    return root


def pytest_collection_finish(session):
    """Stop a full run on a nearly full disk at once, naming the folder, instead of failing minutes later with
    ENOSPC inside a checkpoint copy. A handful of selected tests runs regardless."""
    if len(session.items) < 100 or session.config.option.collectonly:
        return
    folder = Path(session.config.option.basetemp or tempfile.gettempdir())
    while not folder.exists():
        folder = folder.parent
    free_gb = shutil.disk_usage(folder).free / 1e9
    if free_gb < SUITE_DISK_GB:
        pytest.exit(
            f"the test suite needs ~{SUITE_DISK_GB:.0f} GB free under {folder}, which has {free_gb:.1f} GB: "
            "free space there, or point TMPDIR (or pytest --basetemp) at a disk with room",
            returncode=1,
        )


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


requires_ffcv = pytest.mark.skipif(not has_module("ffcv"), reason="ffcv is not installed (make setup installs it)")
requires_dali = pytest.mark.skipif(not has_module("nvidia.dali"), reason="nvidia-dali is not installed")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from dataset_tools.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(
        root,
        num_classes=4,
        train_per_class=16,
        val_per_class=4,
        seed=0,
        workers=2,
        min_short=96,
        max_short=160,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def coded_root(tmp_path_factory) -> Path:
    return make_coded_dataset(tmp_path_factory.mktemp("coded"))


def _convert(root: Path, out: Path, **kw) -> Path:
    from dataset_tools.convert import ConvertOptions, convert

    convert(root, out, ["train", "val"], ConvertOptions(workers=2, progress=False, **kw))
    return out


@pytest.fixture(scope="session")
def synth_betons(synth_root, tmp_path_factory) -> Path:
    pytest.importorskip("ffcv")
    return _convert(synth_root, tmp_path_factory.mktemp("synth_betons"))


@pytest.fixture(scope="session")
def coded_betons(coded_root, tmp_path_factory) -> Path:
    pytest.importorskip("ffcv")
    return _convert(coded_root, tmp_path_factory.mktemp("coded_betons"))


@pytest.fixture(scope="session")
def coded_betons_jpeg(coded_root, tmp_path_factory) -> Path:
    """`coded_betons` with every image stored as JPEG (rn50 convert --compress-prob 1), as GPU decoding wants."""
    pytest.importorskip("ffcv")
    return _convert(coded_root, tmp_path_factory.mktemp("coded_betons_jpeg"), compress_prob=1.0)


def decode_beton(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every stored image and label of a .beton, read without FFCV's loader (see dataset_tools.inspect_beton)."""
    from dataset_tools.inspect_beton import decode_sample, open_beton

    index = open_beton(path)
    sizes = index.sizes_by_ptr()
    images, labels = [], []
    for i in range(index.num_samples):
        image, label = decode_sample(index, i, sizes)
        images.append(image)
        labels.append(label)
    return images, np.array(labels)
