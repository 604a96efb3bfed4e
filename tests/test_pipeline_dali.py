"""dali backend from image folders (run on the CPU with device_id=None): same order and crops as the torchvision
backend, one pipeline for the loader's life, image sizes from the file headers, corrupt files stop it with advice,
and a conversion report leaves them out. (Reading betons: test_pipeline_dali_beton.py.)"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _pipeline_helpers import CPU, epoch_ids
from conftest import REPO, requires_dali
from PIL import Image

from pipeline import LoaderOptions, Placement, build_loader, denormalize

pytestmark = requires_dali
KW = dict(batch_size=8, resolution=24, placement=CPU, verbose=False)


def test_same_order_as_the_torchvision_backend_and_seeded_pixels(coded_root):
    kw = dict(KW, placement=Placement("cpu", torch.float32, rank=0, world_size=2), seed=4)
    dali = build_loader(coded_root, options=LoaderOptions("dali", workers=2), **kw)
    tv = build_loader(coded_root, options=LoaderOptions("torchvision", workers=0), **kw)
    assert dali.source_kind == "folder"
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        tv.set_epoch(epoch)
        assert epoch_ids(dali) == epoch_ids(tv)
    dali.set_epoch(1)
    first = [images for images, _ in dali]
    dali.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), b in zip(dali, first, strict=True))
    assert dali.builds == 1  # four loops over two epochs, one pipeline


def test_same_regions_as_the_torchvision_backend(tmp_path):
    """The folder source cuts the boxes the torchvision backend cuts (pipeline.crops on the file's own size, read
    from its header): on images whose pixels say where they are, the two agree within a few levels, and a missing
    flip would not."""
    h, w = 90, 120
    yy, xx = np.mgrid[0:h, 0:w]
    d = tmp_path / "train" / "n00000000"
    d.mkdir(parents=True)
    for i in range(16):
        Image.fromarray(np.stack([2 * xx, 2 * yy, np.zeros_like(xx)], axis=2).astype(np.uint8)).save(
            d / f"ramp_{i:02d}.{'png' if i % 2 else 'jpg'}", quality=95
        )
    kw = dict(KW, resolution=32, seed=7)
    a = np.concatenate(
        [
            denormalize(x).permute(0, 2, 3, 1).numpy()
            for x, _ in build_loader(tmp_path, options=LoaderOptions("dali", workers=2), **kw)
        ]
    )
    b = np.concatenate(
        [
            denormalize(x).permute(0, 2, 3, 1).numpy()
            for x, _ in build_loader(tmp_path, options=LoaderOptions("torchvision", workers=0), **kw)
        ]
    )
    err = np.abs(a[..., :2] - b[..., :2]).mean(axis=(1, 2)).max(axis=1)
    assert err.max() < 2
    flipped = np.abs(a[..., 0] - b[:, :, ::-1, 0]).mean(axis=(1, 2))
    assert (flipped > 8).sum() >= 12  # all but the narrowest crops would show a wrong flip


def test_float16_comes_from_dali_and_bfloat16_is_converted(coded_root):
    for dtype in (torch.float16, torch.bfloat16):
        loader = build_loader(
            coded_root, options=LoaderOptions("dali", workers=1), **{**KW, "placement": Placement("cpu", dtype)}
        )
        images, _ = next(iter(loader))
        assert images.dtype == dtype and images.is_contiguous(memory_format=torch.channels_last)


def test_resolution_changes_and_epochs_reuse_the_pipeline(coded_root):
    loader = build_loader(coded_root, options=LoaderOptions("dali", workers=1), **KW)
    for res in (24, 40, 24):
        loader.set_resolution(res)
        assert {tuple(x.shape[-2:]) for x, _ in loader} == {(res, res)}
    assert loader.builds == 1


def test_sizes_come_from_the_headers():
    from pipeline.dali_sources import _header_size

    for fmt, kw in (("JPEG", {"quality": 90}), ("JPEG", {"progressive": True}), ("PNG", {})):
        buf = io.BytesIO()
        Image.new("RGB", (123, 45), (1, 2, 3)).save(buf, fmt, **kw)
        assert _header_size(buf.getvalue()) == (45, 123), (fmt, kw)
    assert _header_size(b"GIF89a" + bytes(20)) is None  # other formats: PIL tells


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
    assert build_loader(root, options=LoaderOptions("torchvision", workers=0), **KW).num_samples == 49
    loader = build_loader(
        root, options=LoaderOptions("dali", workers=1, skip_listed_in=report), **{**KW, "batch_size": 48}
    )
    assert loader.num_samples == 48
    assert len(sum(epoch_ids(loader), [])) == 48


def test_a_corrupt_file_stops_dali_with_a_line_naming_it(root_with_corrupt_file):
    # Run apart: on a bad JPEG DALI 2.4's CPU decoder sometimes crashes the process instead of raising; here the
    # header check stops the batch before DALI sees it.
    root, _ = root_with_corrupt_file
    script = (
        "import torch; from pipeline import LoaderOptions, Placement, build_loader\n"
        f"loader = build_loader({str(root)!r}, batch_size=49, resolution=24, placement=Placement('cpu', torch.float32), "
        "options=LoaderOptions('dali', workers=1), verbose=False)\n"
        "for _ in loader: pass\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.contract.SampleError:") and "img_9999.JPEG" in last
    assert "--skip-listed-in convert_report.json" in last
