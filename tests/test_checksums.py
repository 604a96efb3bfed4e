"""Per-sample checksums: rn50 convert writes them, `rn50 inspect --verify` finds a damaged sample (raw or JPEG) by
index and label, `rn50 doctor` spot-checks them, and a beton without them is verified as far as it can be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_ffcv

from dataset_tools import checksums
from dataset_tools.beton_format import JPEG_MODE, RAW_MODE, image_column, read_index

pytestmark = requires_ffcv


@pytest.fixture(scope="module")
def converted(coded_root, tmp_path_factory) -> Path:
    from dataset_tools.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("checksummed")
    convert(coded_root, out, ["train", "val"], ConvertOptions(workers=1, progress=False, compress_prob=0.5))
    return out


@pytest.fixture
def betons(converted, tmp_path) -> Path:
    """A private copy: tests damage it."""
    return Path(shutil.copytree(converted, tmp_path / "b"))


def sample_of(beton: Path, mode: int) -> tuple[int, int, int, int]:
    """(index, label, offset, size) of the first sample stored in `mode`."""
    column = image_column(read_index(beton))
    i = int(np.flatnonzero(column.modes == mode)[0])
    return i, int(column.labels[i]), int(column.ptrs[i]), int(column.sizes[i])


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_convert_writes_checksums_the_manifest_vouches_for(betons):
    manifest = json.loads((betons / "manifest.json").read_text())
    for split in ("train", "val"):
        sums = np.load(betons / f"{split}.checksums.npy")
        entry = manifest["splits"][split]["checksums"]
        assert entry == {
            "file": f"{split}.checksums.npy",
            "algorithm": "crc32",
            "digest": checksums.digest(sums),
            "samples": len(sums),
        }
        assert np.array_equal(sums, checksums.compute(betons / f"{split}.beton"))
        report = checksums.verify(betons / f"{split}.beton", progress=False)
        assert report.ok and report.checked_sums and report.note is None


@pytest.mark.parametrize("mode", [RAW_MODE, JPEG_MODE])
def test_a_damaged_sample_is_named_with_its_label(betons, mode, capsys):
    from dataset_tools.inspect_beton import main

    beton = betons / "train.beton"
    i, label, ptr, size = sample_of(beton, mode)
    flip(beton, ptr + size // 2)  # the middle: a JPEG keeps both markers
    report = checksums.verify(beton, workers=2, progress=False)
    assert [(p.index, p.label) for p in report.problems] == [(i, label)]
    assert report.problems[0].reason.startswith("checksum mismatch")
    assert main([str(beton), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED: 1 of {report.samples} samples" in out and f"sample {i} (n{label:08d})" in out
    assert f"by label: n{label:08d}: 1" in out
    spot = checksums.spot_check(beton, n=10**6)  # every sample: deterministic
    assert spot["state"] == "failed" and spot["bad"] == [i]


def test_without_checksums_only_decodes_and_sizes_are_checked(betons, capsys):
    """A beton from FFCV's own writer has no checksum file: verify says so, still finds a JPEG that lost its end,
    and cannot see a raw sample's changed pixels (the README says so too)."""
    from benchmarks.doctor import checksum_line, checksum_state

    beton = betons / "train.beton"
    (betons / "train.checksums.npy").unlink()
    raw_i, _, raw_ptr, raw_size = sample_of(beton, RAW_MODE)
    jpeg_i, jpeg_label, jpeg_ptr, jpeg_size = sample_of(beton, JPEG_MODE)
    flip(beton, raw_ptr + raw_size // 2)
    flip(beton, jpeg_ptr + jpeg_size - 1)  # the end marker
    report = checksums.verify(beton, progress=False)
    assert not report.checked_sums and "no train.checksums.npy" in report.note
    assert [(p.index, p.label, p.reason) for p in report.problems] == [
        (jpeg_i, jpeg_label, "JPEG without its start or end marker")
    ]
    state = checksum_state(beton)
    assert state["state"] == "none" and "raw samples cannot be checked" in checksum_line("train", state)


def test_a_checksum_file_of_another_conversion_is_not_trusted(betons):
    other = np.load(betons / "val.checksums.npy")
    checksums.write(betons / "train.beton", np.resize(other, len(np.load(betons / "train.checksums.npy"))))
    report = checksums.verify(betons / "train.beton", progress=False)
    assert not report.checked_sums and "not the one the manifest names" in report.note
    assert checksums.spot_check(betons / "train.beton")["state"] == "unusable"


def test_doctor_reports_the_spot_check(betons, capsys):
    from benchmarks.doctor import checksum_line, checksum_state

    assert checksum_line("train", checksum_state(betons / "train.beton")).startswith("data     train.beton checksums: ")
    ok = checksum_state(betons / "train.beton")
    assert ok["state"] == "ok" and ok["checked"] == image_column(read_index(betons / "train.beton")).labels.size
    i, _, ptr, size = sample_of(betons / "train.beton", RAW_MODE)
    flip(betons / "train.beton", ptr + 1)
    failed = checksum_state(betons / "train.beton")
    assert failed["state"] == "failed" and failed["bad"] == [i]
    assert "FAILED, 1 of" in checksum_line("train", failed)
