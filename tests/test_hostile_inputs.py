"""Careless and hostile input to `rn50 train` gets one line and a non-zero exit before anything starts, or a warning
where the run can go on: non-finite and out-of-range numbers, sizes the data or the machine cannot serve, a file where
a folder belongs, a missing GPU, empty splits, one class, a log file instead of a terminal, a locale that cannot
write the path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_helpers import argv
from conftest import REPO

from training.train import main as train_main


def one_line_error(capsys, args: list[str]) -> str:
    assert train_main(args) == 2
    captured = capsys.readouterr()
    text = (captured.err + captured.out).strip()
    lines = [x for x in text.splitlines() if x.startswith("rn50 train: error:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-lr", "nan"),
        ("--max-lr", "inf"),
        ("--weight-decay", "nan"),
        ("--mixup", "nan"),
        ("--checkpoint-minutes", "nan"),
    ],
)
def test_non_finite_numbers_are_refused_by_name(coded_root, tmp_path, capsys, flag, value):
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r") + [flag, value])
    assert line == f"rn50 train: error: {flag} must be a finite number (got {float(value)})"


def test_a_nan_in_a_yaml_preset_is_refused_too(coded_root, tmp_path, capsys):
    preset = tmp_path / "nan.yaml"
    preset.write_text("max_lr: .nan\n")
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r") + ["--config", str(preset)])
    assert "--max-lr must be a finite number" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--base-momentum", "5"], "--base-momentum must be in [0, 1)"),
        (["--momentum", "1.5"], "--momentum must be in [0, 1)"),
        (["--base-momentum", "0.9", "--max-momentum", "0.8"], "--base-momentum must be <= --max-momentum"),
        (["--res", "10000"], "--res 10000: at most 1024 px"),
        (["--workers", "100000"], "--workers 100000: this process may use"),
    ],
)
def test_values_the_run_or_the_machine_cannot_use_are_refused(coded_root, tmp_path, capsys, flags, expected):
    assert expected in one_line_error(capsys, argv(coded_root, tmp_path, "r") + flags)


def test_a_file_for_a_folder_and_a_folder_for_a_file_are_named_as_such(coded_root, tmp_path, capsys):
    some_file = next((coded_root / "train").rglob("*.JPEG"))
    assert "a file, not a folder" in one_line_error(capsys, argv(some_file, tmp_path, "r"))
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r") + ["--config", str(tmp_path)])
    assert f"--config {tmp_path}: a folder" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(coded_root, tmp_path, capsys):
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r") + ["--device", "cuda"])
    assert "--device cuda was asked for but torch sees no CUDA device" in line and "--device cpu" in line


def test_a_batch_larger_than_the_split_is_one_line(coded_root, tmp_path, capsys):
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r", batch_size=64))
    assert "48 train samples cannot give each of 1 rank one full batch of 64" in line and "--batch-size" in line
    assert "drop_last" not in line


def test_too_little_data_for_each_of_two_ranks_is_named():
    from pipeline.contract import TooFewSamples

    with pytest.raises(TooFewSamples, match="6 train samples cannot give each of 2 ranks one full batch of 4"):
        from pipeline.contract import Loader, Placement, Request

        Loader(Request("train", 4, 32), Placement("cpu", rank=1, world_size=2), num_samples=6, classes=["a"])


def test_val_class_folders_without_images_are_one_line(coded_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(coded_root / "train", data / "train")
    for wnid in os.listdir(coded_root / "val"):
        (data / "val" / wnid).mkdir(parents=True)
    line = one_line_error(capsys, argv(data, tmp_path / "out", "r"))
    assert line.endswith("val: no images in its class folders (extensions: .JPEG .jpg .png ...)")


@pytest.mark.slow  # one short training run in a subprocess (~20 s on 2 cores)
def test_one_class_a_log_file_and_a_c_locale_with_a_unicode_path_with_spaces(coded_root, tmp_path):
    """A run whose output goes to a file, under LANG=C with Python's UTF-8 mode off, into a folder named with a space
    and a non-ASCII letter, on a dataset of one class: it finishes, warns about the class, writes plain progress
    lines, skips TensorBoard with a line saying why, and prints hints a shell can take as they are."""
    data = tmp_path / "data"
    for split in ("train", "val"):
        shutil.copytree(coded_root / split / "n00000000", data / split / "n00000000")
    out = tmp_path / "ö out"
    log = tmp_path / "run.log"
    env = {**os.environ, "LANG": "C", "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONPATH": str(REPO)}
    flags = argv(data, out, "one", epochs=1, batch_size=4, progress=True)
    with open(log, "wb") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "training.cli", "train", *flags], cwd=REPO, env=env, stdout=f, stderr=f
        ).returncode
    text = log.read_bytes().decode("utf-8", "replace")
    assert rc == 0, text[-3000:]
    assert "holds one class (n00000000): every prediction is right" in text
    assert "\r" not in text and "epoch 0: " in text  # a plain progress line, no carriage-return frames
    assert "no TensorBoard events are written" in text
    assert f"tensorboard --logdir '{out}/runs'" in text  # quoted: the path has a space
    assert (out / "logs" / "one" / "training_log.md").is_file()
    assert Path(out / "checkpoints" / "one").is_dir()


def test_a_worker_killed_during_a_step_is_one_line(capsys, coded_root, tmp_path, monkeypatch):
    """torch reports a dead DataLoader worker from its SIGCHLD handler, wherever the main thread is: usually inside
    the training step, outside the loader's loop. It ended the run with a traceback from deep in autograd."""
    import signal
    import time

    from pipeline import torchvision_loader
    from training import trainer

    step, calls, pids = trainer.train_step, [], tmp_path / "worker_pids"
    pids.mkdir()
    start_worker = torchvision_loader._start_worker

    def recorded_start(*args, **kwargs):  # runs in each worker process: leave its pid where the test finds it
        (pids / str(os.getpid())).touch()
        return start_worker(*args, **kwargs)

    def step_that_loses_a_worker(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # kill a training worker, then keep the main thread busy in the step
            os.kill(int(sorted(pids.iterdir())[0].name), signal.SIGKILL)
            for _ in range(300):
                time.sleep(0.1)  # the handler raises here, within a moment of the worker's death
        return step(*args, **kwargs)

    monkeypatch.setattr(torchvision_loader, "_start_worker", recorded_start)
    monkeypatch.setattr(trainer, "train_step", step_that_loses_a_worker)
    line = one_line_error(capsys, argv(coded_root, tmp_path, "r", loader="torchvision", workers=2))
    assert "lost a worker process" in line and "killed by signal" in line and "--workers" in line, line
