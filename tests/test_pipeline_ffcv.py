"""ffcv backend specifics: keyed crops reach the compiled decoder, same order as torchvision, process cache with the
page-grouped order under DDP, resolution changes without recompiling, batch buffers kept across epochs, torch's thread
count left alone, decoding threads that leave a core to the training process."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_helpers import CPU, epoch_ids, sample_ids
from conftest import requires_ffcv
from PIL import Image

from pipeline import FFCVOptions, LoaderOptions, Placement, build_loader, denormalize
from pipeline.crops import random_resized_crop_boxes, sample_keys

pytestmark = [
    requires_ffcv,
    pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning"),
]

RAMP_H, RAMP_W = 200, 250


@pytest.fixture(scope="module")
def ramp_betons(tmp_path_factory) -> Path:
    """24 copies of one image with R = x, G = y (half stored as JPEG, half raw, as rn50 convert does by default)."""
    from dataset_tools.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("ramp")
    yy, xx = np.mgrid[0:RAMP_H, 0:RAMP_W]
    image = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], axis=2).astype(np.uint8))
    for split in ("train", "val"):
        d = root / split / "n00000000"
        d.mkdir(parents=True)
        for i in range(24):
            image.save(d / f"ramp_{i:02d}.png")
    out = tmp_path_factory.mktemp("ramp_betons")
    convert(root, out, ["train", "val"], ConvertOptions(workers=1, progress=False))
    return out


@pytest.mark.parametrize("batch_size", [8, 1])  # 1: the boxes are computed 16 batches at a time, so two chunks
def test_train_crops_are_cut_at_the_keyed_boxes_and_flipped(ramp_betons, batch_size):
    res = 50
    loader = build_loader(
        ramp_betons,
        batch_size=batch_size,
        resolution=res,
        placement=CPU,
        options=LoaderOptions(workers=2),
        seed=11,
        verbose=False,
    )
    loader.set_epoch(4)
    plan = loader.plan(4)
    batches = [denormalize(images).round().permute(0, 2, 3, 1).numpy() for images, _ in loader]
    out = np.concatenate(batches)
    boxes, flips = random_resized_crop_boxes(np.full(24, RAMP_H), np.full(24, RAMP_W), sample_keys(11, 4, plan.indices))
    assert 3 <= flips.sum() <= 21
    for img, (top, left, h, w), flip in zip(out, boxes, flips, strict=True):
        x_first, x_last = img[0, 0, 0], img[0, -1, 0]
        if flip:
            x_first, x_last = x_last, x_first
        tol = w / res + 4  # a resized pixel spans w / res source pixels; JPEG q90 adds a few levels
        assert abs(x_first - left) <= tol and abs(x_last - (left + w - 1)) <= tol
        tol = h / res + 4
        assert abs(img[0, 0, 1] - top) <= tol and abs(img[-1, 0, 1] - (top + h - 1)) <= tol
    loader.set_epoch(4)
    again = np.concatenate([denormalize(images).round().permute(0, 2, 3, 1).numpy() for images, _ in loader])
    assert np.array_equal(out, again)  # pixel for pixel, whatever thread decoded which sample
    loader.set_epoch(4, start_batch=17 // batch_size)  # a resumed epoch cuts the remaining samples the same way
    tail = np.concatenate([denormalize(images).round().permute(0, 2, 3, 1).numpy() for images, _ in loader])
    assert np.array_equal(tail, out[17 // batch_size * batch_size :])


def test_val_is_the_centre_crop(ramp_betons):
    loader = build_loader(
        ramp_betons,
        split="val",
        batch_size=8,
        resolution=35,
        placement=CPU,
        options=LoaderOptions(workers=1),
        drop_last=False,
        verbose=False,
    )
    images, _ = next(iter(loader))
    img = denormalize(images).permute(0, 2, 3, 1).numpy()
    side = int(224 / 256 * RAMP_H)  # 175
    top, left = (RAMP_H - side) // 2, (RAMP_W - side) // 2
    assert np.all(np.abs(img[:, 0, 0, 0] - left) <= side / 35 + 4)
    assert np.all(np.abs(img[:, -1, -1, 1] - (top + side - 1)) <= side / 35 + 4)


def test_same_order_as_the_torchvision_backend(coded_root, coded_betons):
    kw = dict(batch_size=8, resolution=24, placement=Placement("cpu", torch.float32, rank=1, world_size=2), seed=2)
    ffcv = build_loader(coded_betons, options=LoaderOptions("ffcv", workers=2), verbose=False, **kw)
    tv = build_loader(coded_root, options=LoaderOptions("torchvision", workers=0), verbose=False, **kw)
    ffcv.set_epoch(3)
    tv.set_epoch(3)
    assert epoch_ids(ffcv) == epoch_ids(tv)


def test_resolution_change_reuses_the_compiled_pipeline(coded_betons):
    loader = build_loader(
        coded_betons, batch_size=8, resolution=24, placement=CPU, options=LoaderOptions(workers=2), verbose=False
    )
    assert next(iter(loader))[0].shape[-1] == 24
    code = loader._ffcv.code
    loader.set_resolution(40)
    assert next(iter(loader))[0].shape[-1] == 40
    assert loader._ffcv.code is code


def test_process_cache_with_page_grouped_order_on_two_ranks(coded_betons):
    ids = []
    for rank in range(2):
        loader = build_loader(
            coded_betons,
            batch_size=6,
            resolution=24,
            placement=Placement("cpu", torch.float32, rank=rank, world_size=2),
            options=LoaderOptions(workers=2, ffcv=FFCVOptions(os_cache=False, order="quasi_random")),
            verbose=False,
        )
        assert len(loader) == 4
        loader.set_epoch(1)
        first = epoch_ids(loader)
        loader.set_epoch(1)
        assert epoch_ids(loader) == first
        ids.append(sum(first, []))
    assert len(ids[0]) == len(ids[1]) == 24
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == 48


def test_batch_buffers_are_allocated_once_per_resolution(coded_betons):
    loader = build_loader(
        coded_betons,
        batch_size=8,
        resolution=24,
        placement=CPU,
        options=LoaderOptions(workers=2),
        seed=5,
        verbose=False,
    )
    buffers = loader._ffcv.buffers
    first = epoch_ids(loader)
    allocated = buffers.allocated
    assert allocated >= 3  # the decoder's output, JPEG and crop-parameter buffers, the labels
    second, third = epoch_ids(loader), epoch_ids(loader)
    assert buffers.allocated == allocated
    loader.set_resolution(40)
    fourth = [(images.shape[-1], sample_ids(images)) for images, _ in loader]
    assert buffers.allocated == allocated + 1  # only the output buffer depends on the resolution
    loader.set_epoch(1)
    assert epoch_ids(loader) == second and buffers.allocated == allocated + 1
    assert first != second != third
    assert {side for side, _ in fourth} == {40}
    loader.set_epoch(3)
    assert [ids for _, ids in fourth] == epoch_ids(loader)


def test_abandoned_and_overlapping_loops_keep_their_batches(coded_betons):
    loader = build_loader(
        coded_betons,
        batch_size=8,
        resolution=24,
        placement=CPU,
        options=LoaderOptions(workers=2),
        seed=6,
        verbose=False,
    )
    loader.set_epoch(2)
    full = {2: epoch_ids(loader), 3: epoch_ids(loader)}
    allocated = loader._ffcv.buffers.allocated
    loader.set_epoch(2)
    next(iter(loader))  # abandoned after one batch: its thread stops, the next loop takes over its buffers
    loader.set_epoch(2)
    assert epoch_ids(loader) == full[2] and loader._ffcv.buffers.allocated == allocated
    loader.set_epoch(2)
    first_loop = iter(loader)
    head = sample_ids(next(first_loop)[0])  # epoch 2's thread has decoded the batches ahead into its slots
    loader.set_epoch(3)
    assert epoch_ids(loader) == full[3]  # a loop while the first is open: buffers of its own, nothing overwritten
    assert loader._ffcv.buffers.allocated > allocated
    assert [head] + [sample_ids(images) for images, _ in first_loop] == full[2]


def test_building_and_running_a_loader_keeps_torch_thread_count(coded_betons):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loader = build_loader(
            coded_betons, batch_size=8, resolution=24, placement=CPU, options=LoaderOptions(workers=2), verbose=False
        )
        assert torch.get_num_threads() == 1
        epoch_ids(loader)
        assert torch.get_num_threads() == 1
        seen = []
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # a thread torch starts later
        later.start()
        later.join()
        assert seen == [1]
    finally:
        torch.set_num_threads(before)


def test_loader_names_its_threads_and_threading_layer(coded_betons):
    loader = build_loader(
        coded_betons, batch_size=8, resolution=24, placement=CPU, options=LoaderOptions(workers=2), verbose=False
    )
    assert re.search(r"; 2 decoding threads, numba (tbb|omp|workqueue) layer$", loader.describe())


def test_default_decoding_threads_leave_a_core_per_rank(monkeypatch):
    from pipeline.ffcv_loader import decode_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decode_threads(0) == 15
    assert decode_threads(6) == 6  # an explicit count is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert decode_threads(0) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert decode_threads(0) == 7
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert decode_threads(0) == 1


def test_decoding_threads_take_each_sample_exactly_once():
    """The atomic counter behind the decoder's scheduling: every thread takes samples until none is left, and each
    index is handed out once, whichever threading layer runs the loop."""
    import numba

    from pipeline.ffcv_loader import _take_next

    @numba.njit(parallel=True)
    def take_all(counter, taken, n):
        counter[0] = 0
        for _ in numba.prange(numba.get_num_threads()):
            while True:
                i = _take_next(counter)
                if i >= n:
                    break
                taken[i] += 1
                spin = 0.0
                for k in range(2_000):  # some work per index, so that every thread is in the loop at once
                    spin += np.sqrt(k + i)
                counter[1] += spin < 0  # keeps the work from being optimised away (never true)

    n = 20_000
    taken = np.zeros(n, np.int64)
    counter = np.zeros(2, np.int64)
    before = numba.get_num_threads()  # importing ffcv set it to 1
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    try:
        take_all(counter, taken, n)
    finally:
        numba.set_num_threads(before)
    assert np.all(taken == 1)
    assert counter[0] == n + numba.config.NUMBA_NUM_THREADS  # no take lost: each thread's last found the batch done


def test_the_first_ffcv_loader_keeps_torch_thread_count(coded_betons):
    """Importing ffcv sets torch's intra-op threads to 1 (ffcv.pipeline.compiler); the process that builds its first
    ffcv loader keeps the count it had (a trainer would otherwise run its model on one thread)."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import torch\ntorch.set_num_threads(2)\nfrom pipeline import LoaderOptions, Placement, build_loader\n"
        f"build_loader({str(coded_betons)!r}, batch_size=8, resolution=16, placement=Placement('cpu', torch.float32), "
        "options=LoaderOptions('ffcv', workers=1), verbose=False)\nprint(torch.get_num_threads())\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-1:] == ["2"], done.stdout + done.stderr


def test_auto_workers_for_every_backend(monkeypatch):
    """--workers -1 (the trainer's default): each rank's share of the cores minus one, for any backend."""
    from pipeline.contract import auto_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_workers(-1) == 11 and auto_workers(0) == 0 and auto_workers(4) == 4


def test_val_pixels_equal_ffcvs_centre_crop_decoder(coded_betons, synth_betons):
    """Val runs through our decoder (for its status slots) with centre boxes: the pixels FFCV's own
    CenterCropRGBImageDecoder gives, JPEG and raw samples alike."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.loader import Loader as FFCVLoader
    from ffcv.loader import OrderOption

    for betons in (coded_betons, synth_betons):
        ours = build_loader(
            betons,
            "val",
            batch_size=4,
            resolution=40,
            placement=CPU,
            options=LoaderOptions(workers=1),
            drop_last=False,
            verbose=False,
        )
        plain = FFCVLoader(
            str(betons / "val.beton"),
            batch_size=4,
            num_workers=1,
            order=OrderOption.SEQUENTIAL,
            pipelines={"image": [CenterCropRGBImageDecoder((40, 40), 224 / 256)], "label": [IntDecoder()]},
        )
        for (x, y), (ref, ref_y) in zip(ours, plain, strict=True):
            got = denormalize(x).permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)
            assert torch.equal(got, torch.as_tensor(np.asarray(ref))) and torch.equal(
                y, torch.as_tensor(ref_y).view(-1)
            )


def damage_first_jpeg(beton: Path) -> tuple[int, int]:
    """Overwrite the start of the first JPEG sample (its SOI marker and header): (sample, label)."""
    from dataset_tools.beton_format import JPEG_MODE, image_column, read_index

    column = image_column(read_index(beton))
    i = int(np.flatnonzero(column.modes == JPEG_MODE)[0])
    with open(beton, "r+b") as f:
        f.seek(int(column.ptrs[i]))
        f.write(bytes(range(7, 7 + 64)))
    return i, int(column.labels[i])


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_jpeg_that_does_not_decode_stops_the_loader_naming_it(coded_betons, tmp_path, split):
    """FFCV's decoders ignore TurboJPEG's error, so the batch slot kept the previous image under this label; ours
    stops with one line naming the sample, its label and the fix, and hands out no batch holding it."""
    import shutil

    from pipeline.contract import SampleError

    data = Path(shutil.copytree(coded_betons, tmp_path / "b"))
    sample, label = damage_first_jpeg(data / f"{split}.beton")
    loader = build_loader(
        data,
        split,
        batch_size=4,
        resolution=32,
        placement=CPU,
        options=LoaderOptions(workers=2),
        drop_last=False,
        verbose=False,
    )
    loader.set_epoch(0)
    plan = loader.plan(0)
    damaged_batch = int(np.flatnonzero(plan.indices == sample)[0]) // 4
    seen = 0
    with pytest.raises(SampleError) as err:
        for _ in loader:
            seen += 1
    assert seen == damaged_batch  # every batch before it, none from it on
    message = str(err.value)
    assert f"sample {sample} (label {label}) is a JPEG that does not decode" in message and "--verify" in message
    assert "\n" not in message
