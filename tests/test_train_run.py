"""CPU runs of the whole trainer: it learns, it writes every log a person reads, and resume is exact."""

from __future__ import annotations

import struct

import pytest
import torch
import yaml
from _train_helpers import argv, learnable_data, records, trained_run
from PIL import Image

from training.checkpoint import load_checkpoint
from training.train import main


@pytest.mark.slow
def test_learns_well_above_chance(tmp_path_factory):
    _, out, run = trained_run(tmp_path_factory)
    recs = records(out, run)
    assert [r["epoch"] for r in recs] == [0, 1, 2, 3, 4]
    # 4 balanced classes: chance is 25%
    assert recs[-1]["val_top1"] >= 60.0, recs[-1]
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]


@pytest.mark.slow  # shares the learning run: the first of these pays for it (~40 s on 2 cores)
def test_logs_plots_and_tensorboard(tmp_path_factory):
    _, out, run = trained_run(tmp_path_factory)
    logs = out / "logs" / run
    recs = records(out, run)
    for key in (
        "train_loss",
        "val_loss",
        "val_top1",
        "val_top5",
        "lr",
        "epoch_time_s",
        "images_per_s",
        "data_wait_pct",
        "res",
    ):
        assert all(key in r for r in recs), key
    md = (logs / "training_log.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| Epoch"))
    for column in ("Train loss", "Val loss", "Top-1", "Top-5", "LR", "Epoch time", "img/s", "Data wait"):
        assert column in header
    rows = [line for line in md if line.startswith("| ") and not line.startswith("| Epoch")]
    assert len(rows) == 5
    assert f"{recs[-1]['val_top1']:.2f}" in rows[-1]
    for name in ("loss.png", "accuracy.png", "lr.png"):
        data = (logs / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width > 200 and height > 100
        with Image.open(logs / name) as im:
            im.verify()
    saved = yaml.safe_load((logs / "config.yaml").read_text())
    assert saved["arch"] == "resnet18" and saved["epochs"] == 5 and saved["num_classes"] == 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "runs" / run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/images_per_s",
        "train/data_wait_pct",
        "epoch/val_top1",
        "epoch/train_loss",
    } <= tags
    assert [e.step for e in acc.Scalars("epoch/val_top1")] == [0, 1, 2, 3, 4]
    assert acc.Scalars("epoch/val_top1")[-1].value == pytest.approx(recs[-1]["val_top1"], rel=1e-5)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(steps) and steps[-1] == 50  # 10 steps per epoch


@pytest.mark.slow
def test_checkpoints_hold_the_whole_state(tmp_path_factory):
    _, out, run = trained_run(tmp_path_factory)
    d = out / "checkpoints" / run
    assert sorted(p.name for p in d.glob("model_*.pt")) == [f"model_{e:03d}.pt" for e in range(5)]
    state = load_checkpoint(d / "checkpoint.pt")
    assert state["epoch"] == 4 and state["next_epoch"] == 5 and state["step"] == 50
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert state["config"]["arch"] == "resnet18" and len(state["classes"]) == 4
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"][0])
    assert state["loader"] == {
        "epoch": 5,
        "batch": 0,
        "seed": 0,
        "resolution": 48,
        "world_size": 1,
        "batch_size": 16,
        "grad_accum": 1,
        "num_samples": 160,
        "backend": "torchvision",
        "order": "random",
    }
    assert state["phase"] == "end_of_epoch" and state["metrics"]["epoch"] == 4
    best = load_checkpoint(d / "best.pt")
    assert best["metrics"]["val_top1"] == max(r["val_top1"] for r in records(out, run))


def _final(out, run):
    return load_checkpoint(out / "checkpoints" / run / "checkpoint.pt")


@pytest.mark.slow  # six short fp16 epochs on the CPU, ~30 s
def test_resume_after_epoch_1_continues_exactly(coded_root, tmp_path_factory):
    """fp16 (so the GradScaler has state), EMA on: a run stopped after epoch 1 and resumed ends bit-identical to the
    uninterrupted run, and at the stop it held exactly the uninterrupted run's epoch-1 state. 16 px images keep
    CPU fp16 (slow) affordable."""
    full, split = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("split")
    common = dict(epochs=3, max_lr=0.02, ema=True, ema_decay=0.9, precision="fp16", res=16, val_res=16, batch_size=8)
    assert main(argv(coded_root, full, "r", **common)) == 0
    assert main(argv(coded_root, split, "r", stop_after_epoch=1, **common)) == 0

    stopped = _final(split, "r")
    reference = load_checkpoint(full / "checkpoints" / "r" / "model_001.pt")
    assert stopped["next_epoch"] == 2 and stopped["step"] == reference["step"] == 12  # 48 images / 8 per step
    assert not (split / "checkpoints" / "r" / "model_002.pt").exists()
    for k in reference["model"]:
        assert torch.equal(stopped["model"][k], reference["model"][k]), k
    # the scaler has moved off its initial state, so restoring it is actually tested
    assert stopped["scaler"]["_growth_tracker"] > 0 or stopped["scaler"]["scale"] != 65536.0

    # resume with only the run name: the saved config supplies everything else
    assert main(["--output-dir", str(split), "--run-name", "r", "--resume"]) == 0
    a, b = _final(full, "r"), _final(split, "r")
    assert b["epoch"] == 2 and b["step"] == a["step"] == 18
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), k
    assert a["ema"]["updates"] == b["ema"]["updates"] == 18
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"]), pid
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["optimizer"]["param_groups"][0]["momentum"] == b["optimizer"]["param_groups"][0]["momentum"]
    assert a["scaler"] == b["scaler"]
    assert a["scheduler"] == b["scheduler"]
    assert [r["epoch"] for r in records(split, "r")] == [0, 1, 2]
    assert [r["val_top1"] for r in records(split, "r")] == [r["val_top1"] for r in records(full, "r")]


def test_augmentations_and_accumulation_run(tmp_path_factory):
    """Every batch-level augmentation and gradient accumulation in one short run; soft targets reach the loss."""
    data = learnable_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("aug")
    rc = main(
        argv(
            data,
            out,
            "aug",
            epochs=1,
            mixup=0.2,
            cutmix=1.0,
            random_erase=0.25,
            auto_augment="trivialaugment",
            grad_accum=2,
            tta=True,
            blurpool=True,
            zero_init_residual=True,
            res=32,
            val_res=32,
            batch_size=8,
            log_every=2,
        )
    )
    assert rc == 0
    state = _final(out, "aug")
    assert state["step"] == 10  # 20 batches of 8 per epoch, 2 per step
    assert state["config"]["grad_accum"] == 2
    rec = records(out, "aug")[0]
    assert rec["train_loss"] > 0 and 0 <= rec["val_top1"] <= 100


def test_existing_run_is_not_overwritten(tmp_path_factory, capsys):
    data, out, run = trained_run(tmp_path_factory)
    before = (out / "checkpoints" / run / "checkpoint.pt").stat().st_mtime_ns
    rc = main(argv(data, out, run))
    assert rc == 2
    assert "--resume" in capsys.readouterr().err
    assert (out / "checkpoints" / run / "checkpoint.pt").stat().st_mtime_ns == before


def test_loader_flags_reach_the_loader_and_a_process_cache_run_trains(coded_betons, tmp_path, monkeypatch):
    """--no-os-cache --loader-order quasi_random (betons bigger than RAM): the trainer's loaders get them, and the
    ffcv backend trains on FFCV's process cache with the page-grouped order."""
    from training import components

    seen = []
    real = components.build_loader

    def spy(data_dir, split, **kwargs):
        loader = real(data_dir, split, **kwargs)
        ffcv = kwargs["options"].ffcv
        seen.append(
            (split, ffcv.os_cache, ffcv.order, loader.backend, getattr(loader, "_sample_pages", None) is not None)
        )
        return loader

    monkeypatch.setattr(components, "build_loader", spy)  # every loader of a run is built there
    rc = main(
        argv(
            coded_betons,
            tmp_path,
            "pc",
            loader="ffcv",
            workers=1,
            epochs=1,
            res=32,
            val_res=32,
            batch_size=8,
            os_cache=False,
            loader_order="quasi_random",
        )
    )
    assert rc == 0
    # train reads pages in windows (page-grouped order); val stays in file order
    assert seen == [("train", False, "quasi_random", "ffcv", True), ("val", False, "quasi_random", "ffcv", False)]
    assert records(tmp_path, "pc")[0]["epoch"] == 0


def test_auto_augment_flag_selects_the_policy():
    """--auto-augment autoaugment runs AutoAugment's ImageNet policy in the batch transform: seeded by (epoch, batch),
    and not the TrivialAugment result."""
    from pipeline.augment import auto_augment, batch_seed
    from training.components import batch_transform
    from training.config import TrainConfig

    images = torch.randn(16, 3, 24, 24).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(16) % 4
    aa = batch_transform(TrainConfig(auto_augment="autoaugment"), 4, rank=0)
    ta = batch_transform(TrainConfig(auto_augment="trivialaugment"), 4, rank=0)
    out, same_labels = aa(images, labels, epoch=1, batch=3)
    assert torch.equal(same_labels, labels)
    expected = auto_augment(images, generator=torch.Generator().manual_seed(batch_seed(0, 1, 3, 0)))
    assert torch.equal(out, expected)
    assert not torch.equal(out, ta(images, labels, epoch=1, batch=3)[0])
    assert batch_transform(TrainConfig(), 4, rank=0) is None


def test_a_second_run_with_the_same_name_stops_and_the_first_is_untouched(coded_root, tmp_path):
    """Two runs with one --run-name and --output-dir: the second stops at once with one line naming the first's pid
    (the run folder's lock), writes nothing, and the first run's files stay as they were."""
    import subprocess
    import sys
    import time

    from conftest import REPO

    from dataset_tools.locks import LOCK_NAME

    folder = tmp_path / "checkpoints" / "twin"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time\nfrom dataset_tools.locks import folder_lock\n"
                f"with folder_lock({str(folder)!r}, 'rn50 train'):\n    print('held', flush=True)\n    time.sleep(60)\n"
            ),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = sorted(p.name for p in tmp_path.rglob("*"))
        t0 = time.monotonic()
        rc = subprocess.run(
            [
                sys.executable,
                "-m",
                "training",
                *argv(coded_root, tmp_path, "twin", epochs=1, res=32, val_res=32, batch_size=8),
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rc.returncode == 2, rc.stderr + rc.stdout
        errors = [line for line in (rc.stdout + rc.stderr).splitlines() if "error" in line]
        assert len(errors) == 1 and f"in use by rn50 train (pid {holder.pid}" in errors[0], errors
        assert time.monotonic() - t0 < 120
        assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, not even logs
        assert (folder / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(
    coded_root, tmp_path, monkeypatch, capsys
):
    """A full disk at an epoch's checkpoint: one line, exit 1, the previous epoch's files intact and resumable."""
    import errno

    from training import checkpoint

    real, calls = checkpoint.save_checkpoint, []

    def full_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoints" / "full"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_on_second)
    rc = main(argv(coded_root, tmp_path, "full", epochs=3, res=32, val_res=32, batch_size=8))
    assert rc == 1
    err = [line for line in capsys.readouterr().out.splitlines() if "error" in line]
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0]
    assert load_checkpoint(tmp_path / "checkpoints" / "full" / "checkpoint.pt")["next_epoch"] == 1
