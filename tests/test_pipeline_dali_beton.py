"""DALI reading the .beton (CPU pipeline, device_id=None): the same samples, order and image regions as the ffcv
backend, exact resume, one pipeline for the loader's life, raw samples, damaged bytes named, `--loader auto`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _pipeline_helpers import CPU, epoch_ids
from conftest import REPO, requires_dali, requires_ffcv
from PIL import Image

from pipeline import LoaderOptions, Placement, build_loader, denormalize
from pipeline.crops import center_crop_boxes, random_resized_crop_boxes, sample_keys

pytestmark = [
    requires_dali,
    requires_ffcv,
    pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning"),
]

RAMP_H, RAMP_W, RAMP_N = 200, 250, 24
KW = dict(batch_size=8, placement=CPU, verbose=False)
CPU_TWO_RANKS = Placement("cpu", torch.float32, rank=1, world_size=2)  # rank 1 of 2


@pytest.fixture(scope="module")
def ramp_betons(tmp_path_factory) -> dict[str, Path]:
    """Images whose pixels say where they are (R = x, G = y, B = 40 * label) converted twice: all JPEG, and with
    rn50 convert's default half raw. Two classes, so labels are checked too."""
    from dataset_tools.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("ramp_dali")
    yy, xx = np.mgrid[0:RAMP_H, 0:RAMP_W]
    for split in ("train", "val"):
        for label in range(2):
            d = root / split / f"n{label:08d}"
            d.mkdir(parents=True)
            image = np.stack([xx, yy, np.full_like(xx, 40 + 120 * label)], axis=2).astype(np.uint8)
            for i in range(RAMP_N // 2):
                Image.fromarray(image).save(d / f"ramp_{i:02d}.png")
    out = {}
    for name, prob in (("jpeg", 1.0), ("mixed", 0.5)):
        out[name] = tmp_path_factory.mktemp(f"ramp_betons_{name}")
        convert(root, out[name], ["train", "val"], ConvertOptions(workers=1, progress=False, compress_prob=prob))
    out["folders"] = root
    return out


def pixels(loader) -> np.ndarray:
    """One pass as float32 (N, R, R, 3) on the 0..255 scale."""
    return np.concatenate([denormalize(x).permute(0, 2, 3, 1).numpy() for x, _ in loader])


def test_the_betons_store_what_the_tests_assume(ramp_betons):
    from dataset_tools.beton_format import image_column, read_index

    assert image_column(read_index(ramp_betons["jpeg"] / "train.beton")).num_raw == 0
    assert 3 <= image_column(read_index(ramp_betons["mixed"] / "train.beton")).num_raw <= RAMP_N - 3


@pytest.mark.parametrize("stored", ["jpeg", "mixed"])
def test_same_labels_and_regions_as_the_ffcv_backend(ramp_betons, stored):
    """Same (seed, epoch): the same label order and, image by image, the same region of the same flip as the ffcv
    backend. The decoders and resamplers differ (FFCV: libjpeg-turbo + OpenCV INTER_AREA; DALI: its own decoder +
    antialiased linear), which leaves about one level on these ramps; a box drawn from another key or epoch, or a
    missing flip, moves whole rows of the ramp (20 levels and more, measured), and the test checks that the other
    flip would be caught."""
    res, data = 40, ramp_betons[stored]
    kw = dict(KW, resolution=res, seed=11, placement=CPU_TWO_RANKS, batch_size=4)
    dali = build_loader(data, options=LoaderOptions("dali", workers=2), **kw)
    ffcv = build_loader(data, options=LoaderOptions("ffcv", workers=2), **kw)
    for loader in (dali, ffcv):
        loader.set_epoch(3)
    ours, labels_dali = zip(*[(denormalize(x), y) for x, y in dali])
    theirs, labels_ffcv = zip(*[(denormalize(x), y) for x, y in ffcv])
    assert torch.equal(torch.cat(labels_dali), torch.cat(labels_ffcv))
    a = torch.cat(ours).permute(0, 2, 3, 1).numpy()
    b = torch.cat(theirs).permute(0, 2, 3, 1).numpy()
    plan = dali.plan(3)
    n = len(plan.indices)
    assert len(a) == n == RAMP_N // 2
    boxes, flips = random_resized_crop_boxes(np.full(n, RAMP_H), np.full(n, RAMP_W), sample_keys(11, 3, plan.indices))
    assert 2 <= flips.sum() <= n - 2
    for img, other, (_, _, _, w), label in zip(a, b, boxes, torch.cat(labels_dali).tolist()):
        assert np.abs(img[..., :2] - other[..., :2]).mean(axis=(0, 1)).max() < 3  # x (R) and y (G), per image
        assert abs(img[..., 2].mean() - (40 + 120 * label)) < 6  # the label's blue
        if w >= 12:  # the other flip is off by w / 2 levels on average
            assert np.abs(img[..., 0] - other[:, ::-1, 0]).mean() > 3


@pytest.mark.parametrize("stored", ["jpeg", "mixed"])
def test_val_is_the_ffcv_centre_crop(ramp_betons, stored):
    res, data = 35, ramp_betons[stored]
    kw = dict(KW, split="val", resolution=res, drop_last=False)
    a = pixels(build_loader(data, options=LoaderOptions("dali", workers=1), **kw))
    b = pixels(build_loader(data, options=LoaderOptions("ffcv", workers=1), **kw))
    top, left, side, _ = center_crop_boxes([RAMP_H], [RAMP_W])[0]
    assert len(a) == len(b) == RAMP_N
    assert np.abs(a[..., :2] - b[..., :2]).mean(axis=(1, 2)).max() < 3
    assert np.all(np.abs(a[:, 0, 0, 0] - left) <= side / res + 4)
    assert np.all(np.abs(a[:, -1, -1, 1] - (top + side - 1)) <= side / res + 4)


def test_pixels_are_deterministic_and_resume_is_the_tail(ramp_betons):
    loader = build_loader(ramp_betons["mixed"], options=LoaderOptions("dali", workers=2), resolution=32, seed=5, **KW)
    loader.set_epoch(2)
    full = pixels(loader)
    other = build_loader(ramp_betons["mixed"], options=LoaderOptions("dali", workers=1), resolution=32, seed=5, **KW)
    other.set_epoch(2)
    assert np.array_equal(pixels(other), full)  # another loader, another thread count: the same bytes
    loader.set_epoch(2, start_batch=1)
    assert np.array_equal(pixels(loader), full[8:])


def test_one_pipeline_across_epochs_resolutions_and_an_abandoned_loop(ramp_betons):
    loader = build_loader(ramp_betons["mixed"], options=LoaderOptions("dali", workers=2), resolution=24, seed=1, **KW)
    assert loader.builds == 0  # built by the first loop
    first = [(x.clone(), y.clone()) for x, y in loader]
    assert loader.builds == 1 and loader.epoch == 1
    loader.set_resolution(40)
    assert {tuple(x.shape) for x, _ in loader} == {(8, 3, 40, 40)}
    loader.set_resolution(24)
    loader.set_epoch(0)
    for _batch in loader:  # leave after one batch: the next loop must not see this loop's queued batches
        break
    loader.set_epoch(0, start_batch=1)
    tail = list(loader)
    assert len(tail) == 2
    for (x, y), (x0, y0) in zip(tail, first[1:], strict=True):
        assert torch.equal(x, x0) and torch.equal(y, y0)
    it = iter(loader)  # a loop that starts while another is paused: the older one may not continue
    next(it)
    loader.set_epoch(0)
    assert len(list(loader)) == 3
    with pytest.raises(RuntimeError, match="newest loop"):
        next(it)
    assert loader.builds == 1


def test_half_precision_comes_from_dali_and_bfloat16_without_a_float32_batch(ramp_betons):
    kw = dict(KW, resolution=32, seed=2)
    reference = build_loader(ramp_betons["jpeg"], options=LoaderOptions("dali", workers=1), **kw)
    x32 = next(iter(reference))[0]
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        loader = build_loader(
            ramp_betons["jpeg"],
            options=LoaderOptions("dali", workers=1),
            **{**kw, "placement": Placement("cpu", dtype)},
        )
        x = next(iter(loader))[0]
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(x.float(), x32, rtol=tol, atol=tol)


def test_train_cli_reads_the_beton_with_dali(ramp_betons, tmp_path, capsys):
    from training.train import main

    out = tmp_path / "run"
    rc = main(
        [
            "--data-dir",
            str(ramp_betons["mixed"]),
            "--loader",
            "dali",
            "--device",
            "cpu",
            "--arch",
            "resnet18",
            "--res",
            "32",
            "--val-res",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--workers",
            "1",
            "--output-dir",
            str(out),
            "--run-name",
            "r",
            "--no-progress",
            "--precision",
            "fp32",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "train backend dali" in text and "from the beton" in text
    assert (out / "checkpoints" / "r" / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------------------------ damaged bytes


def _damage(src: Path, dst: Path, how: str, sample: int) -> tuple[int, int]:
    """Copy the betons to `dst` and break `sample`'s JPEG bytes in train.beton; returns (sample, label)."""
    from dataset_tools.beton_format import image_column, read_index

    shutil.copytree(src, dst)
    column = image_column(read_index(dst / "train.beton"))
    ptr, size = int(column.ptrs[sample]), int(column.sizes[sample])
    with open(dst / "train.beton", "r+b") as f:
        if how == "truncated":  # the end marker gone, as in a copy cut short
            f.seek(ptr + size - 2)
            f.write(b"\0\0")
        else:  # the headers zeroed behind an intact start marker: only a decoder notices
            f.seek(ptr + 2)
            f.write(b"\0" * 200)
    return sample, int(column.labels[sample])


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_damaged_jpeg_bytes_stop_with_a_line_naming_the_sample(ramp_betons, tmp_path, how):
    # Run apart: on some bad JPEGs DALI 2.4's CPU decoder crashes the process instead of raising.
    sample, label = _damage(ramp_betons["jpeg"], tmp_path / "betons", how, sample=13)
    script = (
        "import torch; from pipeline import LoaderOptions, Placement, build_loader\n"
        f"loader = build_loader({str(tmp_path / 'betons')!r}, batch_size=8, resolution=24, "
        "placement=Placement('cpu', torch.float32), options=LoaderOptions('dali', workers=1), verbose=False)\n"
        "for _ in loader: pass\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.contract.SampleError:")
    assert f"train.beton: sample {sample} (label {label})" in last and "rn50 convert" in last


@pytest.mark.parametrize("how", ["truncated"])
def test_damaged_bytes_stop_the_feed_thread_with_the_same_line(ramp_betons, tmp_path, how):
    """With the feed thread the callback's marker check runs in that thread: its SampleError reaches the loop."""
    sample, label = _damage(ramp_betons["jpeg"], tmp_path / "betons", how, sample=13)
    script = (
        "import torch; from pipeline import DALIOptions, LoaderOptions, Placement, build_loader\n"
        f"loader = build_loader({str(tmp_path / 'betons')!r}, batch_size=8, resolution=24, "
        "placement=Placement('cpu', torch.float32), options=LoaderOptions('dali', workers=1, "
        "dali=DALIOptions(feed_thread=True)), verbose=False)\n"
        "for _ in loader: pass\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pipeline.contract.SampleError:") and f"sample {sample} (label {label})" in last


# ------------------------------------------------------------------------------------------------ feed thread


def test_the_feed_thread_gives_the_same_batches_and_resumes_and_abandons_alike(ramp_betons):
    """Same (seed, epoch): the same pixels and labels with and without the feed thread, from a resumed batch too;
    an abandoned loop leaves the pipeline for the next (still one pipeline), and the thread is gone after each loop."""
    import threading

    from pipeline import DALIOptions

    def loader(thread: bool):
        opts = LoaderOptions("dali", workers=2, dali=DALIOptions(feed_thread=thread))
        return build_loader(ramp_betons["mixed"], options=opts, resolution=32, seed=4, **KW)

    plain, fed = loader(False), loader(True)
    seen = {}
    for epoch, start in ((2, 0), (3, 1)):
        plain.set_epoch(epoch, start)
        fed.set_epoch(epoch, start)
        a, b = list(plain), list(fed)
        assert len(a) == len(b) == len(plain) - start
        for (x, y), (u, v) in zip(a, b, strict=True):
            assert torch.equal(x, u) and torch.equal(y, v)
        seen[epoch] = a
    fed.set_epoch(5)
    it = iter(fed)
    next(it)
    it.close()  # abandoned after one batch
    fed.set_epoch(2)
    again = list(fed)
    assert [torch.equal(x, u) for (x, _), (u, _) in zip(again, seen[2], strict=True)] == [True] * len(seen[2])
    assert fed.builds == 1 and not [t for t in threading.enumerate() if t.name == "dali-feed"]


def test_the_trainer_flag_reaches_the_loader():
    from training.components import loader_options
    from training.config import TrainConfig

    assert loader_options(TrainConfig(dali_feed_thread=True)).dali.feed_thread
    assert not loader_options(TrainConfig()).dali.feed_thread


# ------------------------------------------------------------------------------------------------ --loader auto


def test_auto_picks_gpu_decoding_only_for_an_all_jpeg_beton(ramp_betons, monkeypatch):
    import pipeline.build as build

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    backend, why = build.choose_backend(ramp_betons["jpeg"], "train", cuda)
    assert backend == "dali" and f"all {RAMP_N} images JPEG" in why and "GPU" in why
    backend, why = build.choose_backend(ramp_betons["mixed"], "train", cuda)
    assert backend == "ffcv" and "images raw" in why and "--compress-prob 1" in why
    backend, why = build.choose_backend(ramp_betons["jpeg"], "train", torch.device("cpu"))
    assert (backend, why.split("; ")[-1]) == ("ffcv", "not DALI: device is cpu")
    monkeypatch.setattr(build, "available_backends", lambda: ["dali", "torchvision"])  # no ffcv: DALI on the CPU
    assert build.choose_backend(ramp_betons["mixed"], "train", torch.device("cpu"))[0] == "dali"
    monkeypatch.setattr(build, "available_backends", lambda: ["ffcv", "torchvision"])
    assert "DALI not installed" in build.choose_backend(ramp_betons["jpeg"], "train", cuda)[1]


def test_preflight_accepts_dali_on_a_beton_folder(ramp_betons):
    from training.config import TrainConfig
    from training.preflight import check_data

    assert check_data(TrainConfig(data_dir=str(ramp_betons["jpeg"]), loader="dali")) == 2


def test_knobs_default_per_gpu_kind(monkeypatch):
    import pipeline.dali_tuning as tuning

    cpu = tuning.resolve_tuning(torch.device("cpu"), 3, (500, 400))
    assert (cpu.threads, cpu.prefetch, cpu.width_hint, cpu.height_hint) == (3, 2, 500, 400)
    monkeypatch.setattr(tuning, "gpu_kind", lambda device: "hopper")
    h = tuning.resolve_tuning(torch.device("cuda"), 16, (500, 400))
    assert (h.hw_decoder_load, h.threads, h.prefetch, h.device_padding_mb, h.host_padding_mb) == (0.99, 6, 5, 256, 256)
    assert "MLPerf" in h.origin and "not measured" in h.origin
    mine = tuning.resolve_tuning(
        torch.device("cuda"), 16, (500, 400), hw_decoder_load=0.5, threads=4, prefetch=3, nvjpeg_padding_mb=0
    )
    assert (mine.hw_decoder_load, mine.threads, mine.prefetch, mine.device_padding_mb) == (0.5, 4, 3, 0)
    monkeypatch.setattr(tuning, "gpu_kind", lambda device: "gpu")
    other = tuning.resolve_tuning(torch.device("cuda"), 16, (500, 400), hw_decoder_load=-1)
    assert (other.hw_decoder_load, other.threads, other.prefetch, other.device_padding_mb) == (0.65, 16, 2, 16)
    with pytest.raises(ValueError, match="hw_decoder_load"):
        tuning.resolve_tuning(torch.device("cpu"), 1, (1, 1), hw_decoder_load=1.5)


def test_contract_order_matches_ffcv_on_the_coded_betons(coded_betons):
    """The coded betons hold raw and JPEG samples of four classes: the same sample ids as ffcv, epoch by epoch."""
    kw = dict(KW, resolution=24, seed=2, placement=CPU_TWO_RANKS)
    dali = build_loader(coded_betons, options=LoaderOptions("dali", workers=2), **kw)
    ffcv = build_loader(coded_betons, options=LoaderOptions("ffcv", workers=2), **kw)
    for epoch in (0, 1):
        dali.set_epoch(epoch)
        ffcv.set_epoch(epoch)
        assert epoch_ids(dali) == epoch_ids(ffcv)


@pytest.mark.parametrize("stored", ["jpeg", "mixed", "folders"])
def test_a_dropped_loader_frees_its_pipeline_without_the_garbage_collector(ramp_betons, stored):
    """No reference cycle runs through a pipeline: one left to the garbage collector can be finalised inside a
    forked process (rn50 convert forks its writers), where DALI's destructor waits forever for threads the child
    does not have -- this hung a test session once."""
    import gc
    import weakref

    loader = build_loader(ramp_betons[stored], options=LoaderOptions("dali", workers=2), resolution=24, **KW)
    it = iter(loader)
    next(it)  # an abandoned loop, with batches still queued
    del it
    pipe = weakref.ref(loader._pipe)
    gc.disable()
    try:
        del loader
        assert pipe() is None
    finally:
        gc.enable()
