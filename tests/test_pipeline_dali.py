"""dali backend specifics (run on the CPU with device_id=None): same order as the other backends, seeded
augmentation, corrupt files stop it with advice, and a conversion report leaves them out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from _pipeline_helpers import epoch_ids
from conftest import REPO, requires_dali

from pipeline import build_loader

pytestmark = requires_dali
KW = dict(batch_size=8, resolution=24, device="cpu", dtype=torch.float32, verbose=False)


def test_same_order_as_the_torchvision_backend_and_seeded_pixels(coded_root):
    dali = build_loader(coded_root, backend="dali", workers=2, seed=4, rank=0, world_size=2, **KW)
    tv = build_loader(coded_root, backend="torchvision", workers=0, seed=4, rank=0, world_size=2, **KW)
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        tv.set_epoch(epoch)
        assert epoch_ids(dali) == epoch_ids(tv)
    dali.set_epoch(1)
    first = [images for images, _ in dali]
    dali.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), b in zip(dali, first, strict=True))


def test_float16_comes_from_dali_and_bfloat16_is_converted(coded_root):
    for dtype in (torch.float16, torch.bfloat16):
        loader = build_loader(coded_root, backend="dali", workers=1, **{**KW, "dtype": dtype})
        images, _ = next(iter(loader))
        assert images.dtype == dtype and images.is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def root_with_corrupt_file(tmp_path, coded_root):
    root = tmp_path / "data"
    shutil.copytree(coded_root, root)
    bad = root / "train" / "n00000001" / "img_9999.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    report = tmp_path / "convert_report.json"
    report.write_text(json.dumps({"train": {"skipped": [{"path": str(bad), "reason": "truncated"}]}}))
    return root, report


def test_the_conversion_report_leaves_undecodable_files_out(root_with_corrupt_file):
    root, report = root_with_corrupt_file
    assert build_loader(root, backend="torchvision", workers=0, **KW).num_samples == 49
    loader = build_loader(root, backend="dali", workers=1, skip_listed_in=report, **{**KW, "batch_size": 48})
    assert loader.num_samples == 48
    assert len(sum(epoch_ids(loader), [])) == 48


def test_a_corrupt_file_stops_dali(root_with_corrupt_file):
    # Run apart: on a bad JPEG DALI 2.4's CPU decoder sometimes raises and sometimes crashes the process.
    root, _ = root_with_corrupt_file
    script = ("import torch; from pipeline import build_loader\n"
              f"loader = build_loader({str(root)!r}, backend='dali', batch_size=49, resolution=24, workers=1, "
              "device='cpu', dtype=torch.float32, verbose=False)\n"
              "for _ in loader: pass\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    if done.returncode == 1:  # it raised: the message names the folder and the way out
        assert "DALI stopped reading" in done.stderr and "convert_report.json" in done.stderr


def test_a_dali_without_checkpointing_still_trains_and_resumes_the_right_samples(coded_root, monkeypatch, capsys):
    """If this DALI build cannot checkpoint an operator of the train pipeline (its Build raises "Checkpointing is not
    implemented for this operator"), the loader rebuilds the pipeline without checkpointing, says so once, and a
    resume at batch 2 still reads the plan's samples from batch 2 on (with other crops)."""
    import pipeline.dali_loader as dali_loader

    real = dali_loader.DALIGenericIterator
    refused = []

    def refusing(pipe, *args, **kwargs):
        if pipe._enable_checkpointing:
            refused.append(1)
            raise RuntimeError("[operator.h:214] Checkpointing is not implemented for this operator: RandomCrop")
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(dali_loader, "DALIGenericIterator", refusing)
    loader = build_loader(coded_root, backend="dali", workers=1, seed=3, **KW)
    reference = build_loader(coded_root, backend="torchvision", workers=0, seed=3, **KW)
    assert epoch_ids(loader) == epoch_ids(reference)
    assert len(refused) == 1 and "cannot checkpoint the pipeline" in capsys.readouterr().err
    running = iter(loader)
    next(running)
    assert loader.position_state() is None  # nothing to save: a checkpoint holds the position alone
    running.close()

    loader.restore_position(1, 2, {"dali_checkpoint": torch.zeros(4, dtype=torch.uint8)})  # from a DALI that could
    loader.set_epoch(1, start_batch=2)
    reference.set_epoch(1, start_batch=2)
    assert epoch_ids(loader) == epoch_ids(reference) and len(refused) == 1
