"""Exact resume: a run SIGKILLed anywhere (mid-epoch, inside a checkpoint write, during validation, between epochs,
at a random moment) and resumed ends bit-identical to the uninterrupted run; damaged, mismatched or unsafe
checkpoints are refused whole with one clear line."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _resume_helpers import (
    RUNNER,
    assert_same_final_state,
    env,
    flags,
    killed_by,
    latest,
    reference,
    run_in_process,
    run_killed,
)
from conftest import make_coded_dataset, requires_dali

from training.checkpoint import FORMAT_VERSION, Checkpoint, atomic_save, load_checkpoint
from training.model import build_model, build_optimizer
from training.resume import ResumeError, check_compatible, check_position


def _temp_files(out):
    return sorted((out / "checkpoints" / "r").glob(".*.tmp-*"))


@pytest.mark.slow  # five short subprocess runs of the trainer (~1 min on 2 cores)
def test_sigkill_at_random_points_then_resume_is_bit_identical_torchvision(synth_root, tmp_path_factory):
    expected = reference("torchvision", synth_root, tmp_path_factory)
    out = tmp_path_factory.mktemp("killed_tv")
    argv = flags(synth_root, out, resume="auto")
    rng = random.Random(6)  # reproducible "random" kill points; 2 epochs x 4 steps, 5 writes and 4 val batches each
    kills = [("step", rng.randint(1, 5)), ("write", rng.randint(2, 5)), ("val", rng.randint(1, 4)), ("epoch_end", 1)]
    for event, n in kills:
        r = run_killed(argv, event, n)
        assert killed_by(r), (event, n, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
        path = out / "checkpoints" / "r" / "checkpoint.pt"
        if event == "write":
            # the kill came with half of the new checkpoint in its temporary file; the previous one is whole
            assert _temp_files(out), "the kill was meant to land inside a write"
            assert latest(out)["phase"] in ("mid_epoch", "before_validation", "end_of_epoch")
        elif event == "val":
            assert latest(out)["phase"] == "before_validation"  # resuming re-runs validation, not the epoch
        elif event == "epoch_end":
            assert latest(out)["phase"] == "end_of_epoch"
        elif path.exists():
            load_checkpoint(path)
    r = run_killed(argv)  # no kill: runs to the end
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "removed" not in r.stdout or not _temp_files(out)
    assert not _temp_files(out)
    assert_same_final_state(expected, out)


@pytest.mark.slow  # ffcv's import and JIT cost ~20 s per process (~50 s)
def test_sigkill_at_random_moment_then_resume_is_bit_identical_ffcv(synth_betons, tmp_path_factory):
    """Stock FFCV draws crops from numba's unseeded np.random; ours are keyed by (seed, epoch, index), so the
    resumed epoch cuts the same crops. The kill lands at a random moment, from outside (the other kill points are
    covered on the torchvision backend; each ffcv process pays ~20 s of import and JIT)."""
    expected = reference("ffcv", synth_betons, tmp_path_factory, loader="ffcv", workers=1)
    out = tmp_path_factory.mktemp("killed_ffcv")
    argv = flags(synth_betons, out, resume="auto", loader="ffcv", workers=1)
    rng = random.Random(11)
    after_step, delay = rng.randint(2, 6), rng.uniform(0.0, 0.4)
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), "{}", "--", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.strip() == f"STEP {after_step}":
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    r = run_killed(argv)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_final_state(expected, out)


@requires_dali
@pytest.mark.slow  # three in-process runs with DALI's CPU pipeline (~30 s)
def test_dali_resumes_mid_epoch_bit_identical(synth_root, tmp_path_factory, monkeypatch):
    """DALI cuts the crops our callback computes from (seed, epoch, index), so a resumed epoch cuts the same crops
    with no DALI state saved. Checked on the CPU pipeline from the image folders; a
    SIGTERM (in-process) stops the first try."""
    from training import trainer

    kw = dict(loader="dali", workers=2, device="cpu", epochs=1)
    expected = reference("dali", synth_root, tmp_path_factory, **kw)
    out = tmp_path_factory.mktemp("stopped_dali")
    train_step, steps = trainer.train_step, []

    def step_then_sigterm(*args, **kwargs):
        result = train_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    assert run_in_process(flags(synth_root, out, checkpoint_every=0, **kw)) == 143
    state = latest(out)
    assert state["phase"] == "mid_epoch" and state["loader"]["batch"] == 4
    assert "loader_states" not in state  # nothing but (epoch, batch) to save
    monkeypatch.setattr(trainer, "train_step", train_step)
    assert run_in_process(flags(synth_root, out, checkpoint_every=0, resume="yes", **kw)) == 0
    assert_same_final_state(expected, out)


def test_a_checkpoint_with_the_old_loader_states_entry_resumes_bit_identical(synth_root, tmp_path_factory, monkeypatch):
    """Checkpoints written while loaders still had a state hook carry "loader_states": [None] (one None per rank);
    such a mid-epoch checkpoint loads and resumes like any other: the entry is ignored."""
    from training import trainer

    expected = reference("torchvision", synth_root, tmp_path_factory)
    out = tmp_path_factory.mktemp("old_entry")
    train_step, steps = trainer.train_step, []

    def step_then_sigterm(*args, **kwargs):
        result = train_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(trainer, "train_step", step_then_sigterm)
    assert run_in_process(flags(synth_root, out)) == 143
    monkeypatch.setattr(trainer, "train_step", train_step)
    state = latest(out)
    assert (state["phase"], state["step"]) == ("mid_epoch", 3)
    atomic_save({**state, "loader_states": [None]}, out / "checkpoints" / "r" / "checkpoint.pt")
    assert run_in_process(flags(synth_root, out, resume="yes")) == 0
    assert_same_final_state(expected, out)


# ------------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def run_copy(synth_root, tmp_path_factory, tmp_path):
    """A copy of the finished reference run's checkpoint folder (the latest checkpoint and config.yaml)."""
    src = reference("torchvision", synth_root, tmp_path_factory) / "checkpoints" / "r"
    dst = tmp_path / "checkpoints" / "r"
    dst.mkdir(parents=True)
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(src / name, dst / name)
    return tmp_path


def _resume(out, capsys, *extra: str) -> tuple[int, str]:
    rc = run_in_process(["--output-dir", str(out), "--run-name", "r", "--resume", "--epochs", "3", *extra])
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def test_damaged_checkpoint_is_refused_with_the_file_and_the_fix(run_copy, capsys):
    path = run_copy / "checkpoints" / "r" / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # what a full disk or a torn copy leaves
    rc, text = _resume(run_copy, capsys)
    assert rc == 2
    error = [line for line in text.splitlines() if "error" in line]
    assert len(error) == 1 and str(path) in error[0] and "not a readable rn50 checkpoint" in error[0]
    assert "start a new --run-name" in error[0]
    assert path.read_bytes() == data[: len(data) // 3]  # refused, not rewritten
    assert not (run_copy / "logs" / "r" / "training_log.json").exists()  # nothing started


def test_damaged_checkpoint_points_at_the_newest_epoch_file(run_copy, capsys):
    d = run_copy / "checkpoints" / "r"
    shutil.copy(d / "checkpoint.pt", d / "model_001.pt")
    (d / "checkpoint.pt").write_bytes(b"\x00" * 100)
    rc, text = _resume(run_copy, capsys)
    assert rc == 2 and "model_001.pt: copy it over checkpoint.pt" in text


def test_other_arch_is_refused(run_copy, capsys):
    rc, text = _resume(run_copy, capsys, "--arch", "resnet34")
    assert rc == 2
    assert "holds a resnet18, this run builds a resnet34; resume with --arch resnet18" in text


def test_other_class_count_is_refused(run_copy, tmp_path, capsys):
    three = make_coded_dataset(tmp_path / "three", classes=3, train_per_class=8, val_per_class=1)
    rc, text = _resume(run_copy, capsys, "--data-dir", str(three))
    assert rc == 2 and "has 3 classes but the config expects --num-classes 4" in text  # caught before torch loads
    rc, text = _resume(run_copy, capsys, "--data-dir", str(three), "--num-classes", "0")
    assert rc == 2
    assert "trained on 4 classes" in text and "has 3" in text and "start a new --run-name" in text


def test_half_fitting_checkpoint_is_refused_before_anything_loads(run_copy, capsys):
    """The model part fits, the EMA part does not: refused whole (the checks run before the first tensor copy)."""
    path = run_copy / "checkpoints" / "r" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["ema"]["module"]["fc.weight"] = torch.zeros(7, 512)
    atomic_save(state, path)
    rc, text = _resume(run_copy, capsys)
    assert rc == 2 and "EMA does not fit" in text and "fc.weight: saved (7, 512)" in text


def test_checks_compare_every_part_without_touching_the_model():
    model = build_model("resnet18", 4, channels_last=False)
    optimizer, _ = build_optimizer(model, 5e-5, 0.9, False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {
        "format": FORMAT_VERSION,
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {},
        "scaler": {},
        "step": 0,
        "next_epoch": 1,
        "config": {"arch": "resnet18"},
        "classes": ["a", "b", "c", "d"],
    }
    kw = dict(
        arch="resnet18", classes=["a", "b", "c", "d"], data_dir="d", model=model, optimizer=optimizer, ema_module=None
    )
    check_compatible(Checkpoint(Path("c.pt"), good), **kw)
    other = build_model("resnet18", 4, blurpool=True, channels_last=False)
    bad_model = {**good, "model": other.state_dict()}
    with pytest.raises(ResumeError, match="c.pt: its model does not fit this run's resnet18 .*unexpected"):
        check_compatible(Checkpoint(Path("c.pt"), bad_model), **kw)
    bad_opt = {**good, "optimizer": {"state": {}, "param_groups": [{"params": [0, 1]}]}}
    with pytest.raises(ResumeError, match="parameter groups of sizes"):
        check_compatible(Checkpoint(Path("c.pt"), bad_opt), **kw)
    with pytest.raises(ResumeError, match="incomplete checkpoint .no scaler"):
        check_compatible(Checkpoint(Path("c.pt"), {k: v for k, v in good.items() if k != "scaler"}), **kw)
    with pytest.raises(ResumeError, match="mid-epoch checkpoint without its epoch progress"):
        check_compatible(Checkpoint(Path("c.pt"), {**good, "phase": "mid_epoch"}), **kw)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_mid_epoch_position_needs_the_same_shards(tmp_path):
    mid = {
        "phase": "mid_epoch",
        "next_epoch": 3,
        "loader": {
            "epoch": 3,
            "batch": 40,
            "seed": 0,
            "world_size": 8,
            "batch_size": 256,
            "grad_accum": 1,
            "num_samples": 1281167,
        },
    }
    same = dict(world_size=8, batch_size=256, grad_accum=1, seed=0, num_samples=1281167)
    assert check_position(Checkpoint(tmp_path / "checkpoint.pt", mid), **same) == []
    with pytest.raises(ResumeError, match=r"middle of epoch 3 with world_size 8 \(now 4\).*same number of processes"):
        check_position(Checkpoint(tmp_path / "checkpoint.pt", mid), **{**same, "world_size": 4})
    (tmp_path / "model_002.pt").touch()
    with pytest.raises(ResumeError, match="copy model_002.pt over checkpoint.pt"):
        check_position(Checkpoint(tmp_path / "checkpoint.pt", mid), **{**same, "batch_size": 128})
    with_order = {**mid, "loader": {**mid["loader"], "order": "random"}}
    with pytest.raises(ResumeError, match=r"order random \(now quasi_random\).*--loader-order"):
        check_position(Checkpoint(tmp_path / "checkpoint.pt", with_order), **{**same, "order": "quasi_random"})
    boundary = {**mid, "phase": "end_of_epoch", "loader": {**mid["loader"], "batch": 0}}
    warnings = check_position(Checkpoint(tmp_path / "checkpoint.pt", boundary), **{**same, "world_size": 4})
    assert len(warnings) == 1 and "world_size 8 -> 4" in warnings[0]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_load_weights_only_so_a_pickled_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": FORMAT_VERSION, "model": {}, "x": _Exploit(marker)}, path)
    with pytest.raises(ValueError, match="checkpoint.pt: not a readable rn50 checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_auto_starts_a_missing_run_and_continues_an_existing_one(synth_root, tmp_path, capsys):
    argv = flags(
        synth_root,
        tmp_path,
        epochs=1,
        resume="auto",
        checkpoint_every=0,
        ema=False,
        mixup=0.0,
        cutmix=0.0,
        random_erase=0.0,
        auto_augment="none",
    )
    assert run_in_process(argv) == 0
    assert latest(tmp_path)["step"] == 4 and "training epochs 0..0" in capsys.readouterr().out
    assert run_in_process(argv) == 0  # the same line again: nothing left to do, said so
    assert "nothing to train" in capsys.readouterr().out


def test_resume_flag_forms_and_configs_from_before_auto(tmp_path, synth_root):
    from training.config import from_dict
    from training.train import build_parser, resolve_config

    parse = build_parser().parse_args
    assert parse(["--resume"]).resume == "yes" and parse(["--resume", "auto"]).resume == "auto"
    assert parse(["--resume", "no"]).resume == "no"
    with pytest.raises(SystemExit):
        parse(["--resume", "maybe"])
    assert from_dict({"resume": True}).resume == "yes" and from_dict({"resume": False}).resume == "no"

    run = tmp_path / "checkpoints" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"data_dir: {synth_root}\n")  # written at start; killed before a checkpoint
    base = ["--run-name", "r", "--output-dir", str(tmp_path), "--data-dir", str(synth_root)]
    with pytest.raises(ValueError, match="stopped before its first checkpoint; start it again with --resume auto"):
        resolve_config(parse([*base, "--resume"]))
    assert resolve_config(parse([*base, "--resume", "auto"])).resume == "auto"  # nothing to continue: starts
    with pytest.raises(ValueError, match="--resume auto needs --run-name"):
        resolve_config(parse(["--data-dir", str(synth_root), "--resume", "auto"]))
