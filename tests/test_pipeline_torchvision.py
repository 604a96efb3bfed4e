"""torchvision backend specifics: worker processes, per-sample crops keyed by (seed, epoch, index), errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _pipeline_helpers import epoch_ids
from PIL import Image

from pipeline import build_loader
from pipeline.crops import random_resized_crop_boxes, sample_keys
from pipeline.torchvision_loader import FolderCrops


def test_worker_processes_give_the_same_batches_as_the_main_process(synth_root):
    kw = dict(split="train", backend="torchvision", batch_size=8, resolution=32, device="cpu",
              dtype=torch.float32, seed=1, verbose=False)
    in_process, workers = build_loader(synth_root, workers=0, **kw), build_loader(synth_root, workers=2, **kw)
    for epoch in (0, 1):  # the second epoch runs on the same persistent workers
        in_process.set_epoch(epoch)
        workers.set_epoch(epoch)
        for (xa, ya), (xb, yb) in zip(in_process, workers, strict=True):
            assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # a resumed epoch yields the remaining batches pixel for pixel (crops keyed by sample, not drawn in sequence)
    in_process.set_epoch(1)
    full = [x for x, _ in in_process]
    workers.set_epoch(1, start_batch=3)
    assert all(torch.equal(a, b) for a, (b, _) in zip(full[3:], workers, strict=True))


def test_each_sample_is_cut_at_the_box_keyed_by_seed_epoch_index(tmp_path):
    # R = x, G = y: the output's corner pixels tell where the crop was cut and whether it was flipped
    h, w, res = 200, 250, 50
    yy, xx = np.mgrid[0:h, 0:w]
    Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=2).astype(np.uint8)).save(tmp_path / "ramp.png")
    ds = FolderCrops([(str(tmp_path / "ramp.png"), 0)] * 40, train=True, seed=5, scale=(0.08, 1.0),
                     ratio=(3 / 4, 4 / 3), val_crop_ratio=0.875)
    flipped = 0
    for index in range(40):
        out, _ = ds[(index, 9, res)]
        assert out.shape == (res, res, 3)
        (top, left, bh, bw), = random_resized_crop_boxes([h], [w], sample_keys(5, 9, [index]))[0]
        flip = bool(random_resized_crop_boxes([h], [w], sample_keys(5, 9, [index]))[1][0])
        flipped += flip
        x0, x1 = (int(out[0, -1, 0]), int(out[0, 0, 0])) if flip else (int(out[0, 0, 0]), int(out[0, -1, 0]))
        tol = bw / res + 2
        assert abs(x0 - left) <= tol and abs(x1 - (left + bw - 1)) <= tol
        assert abs(int(out[0, 0, 1]) - top) <= bh / res + 2 and abs(int(out[-1, 0, 1]) - (top + bh - 1)) <= bh / res + 2
    assert 5 < flipped < 35
    # another epoch cuts elsewhere
    assert not np.array_equal(ds[(0, 9, res)][0], ds[(0, 10, res)][0])


def test_unreadable_image_error_names_the_file(tmp_path, coded_root):
    bad = tmp_path / "train" / "n00000000" / "broken.JPEG"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    loader = build_loader(tmp_path, backend="torchvision", batch_size=1, resolution=16, workers=0, device="cpu",
                          dtype=torch.float32, verbose=False)
    with pytest.raises(RuntimeError, match="broken.JPEG: cannot be decoded"):
        epoch_ids(loader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(coded_root):
    with pytest.raises(RuntimeError, match="device is cuda but torch sees no GPU"):
        build_loader(coded_root, backend="torchvision", device="cuda", verbose=False)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither train.beton nor a train/ image folder"):
        build_loader(tmp_path, device="cpu", verbose=False)
