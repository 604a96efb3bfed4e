"""torchvision backend specifics: worker processes, per-sample crops keyed by (seed, epoch, index), errors."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _pipeline_helpers import CPU, epoch_ids, sample_ids
from conftest import REPO
from PIL import Image

from dataset_tools.files import DataFolderError
from pipeline import LoaderOptions, Placement, build_loader
from pipeline.crops import random_resized_crop_boxes, sample_keys
from pipeline.torchvision_loader import FolderCrops


def test_worker_processes_give_the_same_batches_as_the_main_process(synth_root):
    kw = dict(split="train", batch_size=8, resolution=32, placement=CPU, seed=1, verbose=False)
    in_process = build_loader(synth_root, options=LoaderOptions("torchvision", workers=0), **kw)
    workers = build_loader(synth_root, options=LoaderOptions("torchvision", workers=2), **kw)
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
    ds = FolderCrops(
        [(str(tmp_path / "ramp.png"), 0)] * 40,
        train=True,
        seed=5,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        val_crop_ratio=0.875,
    )
    flipped = 0
    for index in range(40):
        out, _, _ = ds[(index, 9, res)]
        assert out.shape == (res, res, 3)
        ((top, left, bh, bw),) = random_resized_crop_boxes([h], [w], sample_keys(5, 9, [index]))[0]
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
    loader = build_loader(
        tmp_path,
        batch_size=1,
        resolution=16,
        placement=CPU,
        options=LoaderOptions("torchvision", workers=0),
        verbose=False,
    )
    with pytest.raises(DataFolderError, match="broken.JPEG: cannot be decoded"):
        epoch_ids(loader)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(coded_root):
    with pytest.raises(RuntimeError, match="device is cuda but torch sees no GPU"):
        build_loader(coded_root, placement=Placement("cuda"), options=LoaderOptions("torchvision"), verbose=False)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither train.beton nor a train/ image folder"):
        build_loader(tmp_path, placement=CPU, verbose=False)


def _coded_copy(tmp_path, **kw):
    from conftest import make_coded_dataset

    return make_coded_dataset(tmp_path / "data", **kw)


def test_undecodable_image_is_replaced_by_the_next_file_and_named_once(tmp_path, capfd):
    """An empty or garbage file costs one sample, not the run: the next file in ImageFolder order takes its place (so
    batch shapes hold and the batch stays a pure function of (seed, epoch, index)), and it is named once."""
    root = _coded_copy(tmp_path, classes=2, train_per_class=6, val_per_class=2)
    (root / "train" / "n00000000" / "img_0002.JPEG").write_bytes(b"")  # index 2: replaced by index 3 (class 0)
    (root / "train" / "n00000000" / "img_0005.JPEG").write_bytes(b"<html>404</html>")  # index 5: by class 1's first
    kw = dict(split="train", batch_size=4, resolution=16, placement=CPU, seed=3, verbose=False)
    in_process = build_loader(root, options=LoaderOptions("torchvision", workers=0), **kw)
    workers = build_loader(root, options=LoaderOptions("torchvision", workers=2), **kw)
    expected_id = {2: (0, 3), 5: (1, 0)}
    for epoch in (0, 1):
        in_process.set_epoch(epoch)
        workers.set_epoch(epoch)
        plan = workers.plan(epoch)
        for b, ((xa, ya), (xb, yb)) in enumerate(zip(in_process, workers, strict=True)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert len(yb) == 4
            ids = sample_ids(xb)
            assert [label for label, _ in ids] == yb.tolist()  # the label is the replacement's own
            for index, got in zip(plan.batch(b), ids, strict=True):
                if int(index) in expected_id:
                    assert got == expected_id[int(index)]
    err = capfd.readouterr().err
    for name in ("img_0002.JPEG", "img_0005.JPEG"):
        assert sum(name in line for line in err.splitlines()) == 2, err  # once per loader, not per epoch or worker
    for epoch in (0, 1):  # and every epoch ends with the count, once per loader (a bad file costs a read each epoch)
        counted = [
            line for line in err.splitlines() if f"train epoch {epoch}: skipped 2 undecodable file reads" in line
        ]
        assert len(counted) == 2, err
    assert set(workers.skipped) == {str(root / "train" / "n00000000" / n) for n in ("img_0002.JPEG", "img_0005.JPEG")}


def test_a_split_of_undecodable_files_stops_with_one_line(tmp_path):
    root = _coded_copy(tmp_path, classes=1, train_per_class=3, val_per_class=1)
    for p in (root / "train" / "n00000000").iterdir():
        p.write_bytes(b"")
    loader = build_loader(
        root,
        batch_size=2,
        resolution=16,
        placement=CPU,
        options=LoaderOptions("torchvision", workers=1),
        verbose=False,
    )
    with pytest.raises(DataFolderError, match=r"img_000\d.JPEG: cannot be decoded .* no file of .* can be decoded"):
        next(iter(loader))


_EXIT_PROBE = """
import sys, torch
from pipeline import LoaderOptions, Placement, build_loader
loader = build_loader(sys.argv[1], batch_size=4, resolution=16, placement=Placement("cpu", torch.float32),
                      options=LoaderOptions("torchvision", workers=1), verbose=False)
next(iter(loader))
if sys.argv[2] == "raise":
    raise RuntimeError("an error anywhere after the workers started")
print("done")
"""


@pytest.mark.parametrize("how", ["raise", "return"])
def test_process_with_live_workers_exits(tmp_path, coded_root, how):
    """Persistent workers ignore SIGTERM (the trainer stops them itself), which is what multiprocessing's exit
    handler sends them: a process that ends while a loader is alive (an exception, or a loader in a global) hung."""
    proc = subprocess.run(
        [sys.executable, "-c", _EXIT_PROBE, str(coded_root), how], cwd=REPO, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == (1 if how == "raise" else 0), proc.stderr


_FAILED_TEST_PROBE = """
import os, torch
from pipeline import LoaderOptions, Placement, build_loader

def test_fails_while_holding_a_loader(capfd):
    loader = build_loader(os.environ["PROBE_DATA"], batch_size=4, resolution=16, verbose=False,
                          placement=Placement("cpu", torch.float32), options=LoaderOptions("torchvision", workers=2))
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    assert False, "the traceback keeps the loader in a reference cycle"

def test_after_it():
    pass
"""


def test_a_loader_collected_as_garbage_still_stops_its_workers(tmp_path, coded_root):
    """A loader dropped inside a reference cycle (here: a failed test's traceback) was collected without its workers
    being stopped -- DataLoader's clean-up sends SIGTERM, which they ignore -- and multiprocessing's exit handler then
    waited for them forever, so the process never ended."""
    probe = tmp_path / "probe_test.py"
    probe.write_text(_FAILED_TEST_PROBE)
    env = dict(os.environ, PROBE_DATA=str(coded_root))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "1 failed, 1 passed" in proc.stdout, proc.stdout + proc.stderr


_ORPHAN_PROBE = """
import os, sys, time, torch
from pipeline import LoaderOptions, Placement, build_loader
loader = build_loader(sys.argv[1], batch_size=4, resolution=16, placement=Placement("cpu", torch.float32),
                      options=LoaderOptions("torchvision", workers=2), verbose=False)
it = iter(loader)
next(it)
print(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read(), flush=True)
time.sleep(300)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_exit_promptly_when_the_main_process_is_killed(coded_root):
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_PROBE, str(coded_root)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.05)
    assert not any(_alive(p) for p in workers), "DataLoader workers outlived their killed parent by > 3 s"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # a one-epoch CPU run and two evaluations (~45 s on 2 cores)
def test_train_and_eval_with_an_empty_val_image_finish_and_name_it(synth_root, tmp_path):
    """An empty val image used to cost the epoch (trained, then a hang before any checkpoint)."""
    import shutil

    data = tmp_path / "d"
    shutil.copytree(synth_root, data)
    bad = next(p for p in sorted((data / "val").iterdir()) if p.is_dir()) / "zero.JPEG"
    bad.write_bytes(b"")
    run = [sys.executable, "-m", "training.cli"]
    train = subprocess.run(
        run
        + [
            "train",
            "--data-dir",
            str(data),
            "--arch",
            "resnet18",
            "--res",
            "64",
            "--val-res",
            "64",
            "--batch-size",
            "16",
            "--workers",
            "1",
            "--epochs",
            "1",
            "--no-progress",
            "--device",
            "cpu",
            "--output-dir",
            str(tmp_path / "o"),
            "--run-name",
            "zv",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    assert sum(str(bad) in line for line in train.stderr.splitlines()) == 1, train.stderr
    best = tmp_path / "o" / "checkpoints" / "zv" / "best.pt"
    assert best.is_file()
    ev = subprocess.run(
        run + ["eval", "--checkpoint", str(best), "--data-dir", str(data), "--workers", "1", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0 and "top-1" in ev.stdout, ev.stderr
    assert sum(str(bad) in line for line in ev.stderr.splitlines()) == 1, ev.stderr
    for p in (data / "val").rglob("*.JPEG"):  # nothing decodes: one line, exit 2, no hang
        p.write_bytes(b"")
    ev = subprocess.run(
        run + ["eval", "--checkpoint", str(best), "--data-dir", str(data), "--workers", "1", "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in ev.stderr.splitlines() if "error" in line]
    assert ev.returncode == 2 and len(errors) == 1 and "cannot be decoded" in errors[0], ev.stderr
    assert "Traceback" not in ev.stderr


def test_unreadable_folders_are_one_line_at_build_time(coded_root, monkeypatch):
    """chmod 000 does not stop root (the tests' user): the refusal is simulated where the folder is listed/checked."""
    import os

    import dataset_tools.files as files
    import pipeline.build as build

    real_scandir, real_access = os.scandir, os.access
    denied = str(coded_root / "train" / "n00000001")

    def scandir(path="."):
        if str(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    kw = dict(
        batch_size=4, resolution=16, placement=CPU, options=LoaderOptions("torchvision", workers=0), verbose=False
    )
    monkeypatch.setattr(files.os, "scandir", scandir)
    with pytest.raises(DataFolderError, match="n00000001: cannot be listed .Permission denied.; check its perm"):
        build_loader(coded_root, **kw)
    monkeypatch.undo()
    monkeypatch.setattr(
        build.os, "access", lambda p, mode: False if str(p) == str(coded_root) else real_access(p, mode)
    )
    with pytest.raises(DataFolderError, match="cannot be read"):
        build_loader(coded_root, **kw)


SHM_SCRIPT = """
import sys, time, torch
from pipeline import LoaderOptions, Placement, build_loader
from pipeline.contract import LoaderError
loader = build_loader(sys.argv[1], "train", batch_size=16, resolution=224, placement=Placement("cpu", torch.float32),
                      options=LoaderOptions("torchvision", workers=2), verbose=False)
try:
    for _ in loader:
        pass
except LoaderError as e:
    print("LoaderError:", e)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare for a private /dev/shm"
)
def test_a_full_dev_shm_is_one_line_not_a_hang(synth_root, tmp_path):
    """A 1 MB /dev/shm (Docker's default is 64 MB) in a private mount namespace: the workers cannot hand a 224 px batch
    over. The loader stops at once with one line naming /dev/shm and the fix; it used to wait forever."""
    script = tmp_path / "shm.py"
    script.write_text(SHM_SCRIPT)
    cmd = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} {script} {synth_root}"
    try:
        proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the loader waited for a batch that a worker could not hand over")
    if "mount" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("LoaderError:")]
    assert "/dev/shm holds 1 MB" in line and "--shm-size" in line and "--workers 0" in line


def test_a_dead_worker_stops_the_loop_with_one_line(coded_root):
    from pipeline.contract import LoaderError
    from pipeline.torchvision_loader import lost_worker

    loader = build_loader(
        coded_root,
        "train",
        batch_size=4,
        resolution=32,
        placement=CPU,
        options=LoaderOptions("torchvision", workers=2),
        verbose=False,
    )
    it = iter(loader)
    next(it)
    workers = loader._dataloader._iterator._workers
    with pytest.raises(Exception) as info:
        os.kill(workers[0].pid, signal.SIGKILL)
        for _ in it:
            pass
    # the loop names the loss; torch's SIGCHLD handler may beat it, raising its own error at whatever line runs (here
    # possibly the kill's), which the trainer turns into the same line through lost_worker
    failure = info.value if isinstance(info.value, LoaderError) else lost_worker(info.value)
    assert isinstance(failure, LoaderError), repr(info.value)
    assert re.search("lost a worker process .* out-of-memory killer", str(failure)), failure


def test_more_workers_than_the_machine_can_run_are_refused(coded_root):
    with pytest.raises(ValueError, match=r"--workers 10000: this process may use \d+ cores?, .* use at most \d+"):
        build_loader(
            coded_root,
            "train",
            batch_size=4,
            resolution=32,
            placement=CPU,
            options=LoaderOptions("torchvision", workers=10000),
            verbose=False,
        )


def test_lost_worker_knows_only_torch_s_dead_worker_messages():
    from pipeline.contract import LoaderError
    from pipeline.torchvision_loader import lost_worker

    for text in (
        "DataLoader worker (pid 12) is killed by signal: Killed. ",
        "DataLoader worker (pid(s) 12, 13) exited unexpectedly",
        "DataLoader worker (pid 12) exited unexpectedly with exit code 1. Details are lost due to multiprocessing.",
    ):
        failure = lost_worker(RuntimeError(text))
        assert isinstance(failure, LoaderError) and "lost a worker process" in str(failure), text
        assert "12" in str(failure) and "\n" not in str(failure)
    for other in (RuntimeError("CUDA out of memory"), ValueError("DataLoader worker (pid 12) is killed by signal")):
        assert lost_worker(other) is None
