"""Checkpoint files: atomic writes, per-epoch links, keep-last, best.pt, weights_only loading, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from training.checkpoint import (
    FORMAT_VERSION,
    atomic_save,
    epoch_files,
    load_checkpoint,
    remove_unfinished,
    rng_state,
    save_checkpoint,
    save_latest,
    set_rng_state,
)


def state(value: float) -> dict:
    return {
        "format": FORMAT_VERSION,
        "model": {"w": torch.full((3,), value)},
        "epoch": int(value),
        "config": {"arch": "resnet18", "step_epochs": [1, 2]},
    }


def test_per_epoch_files_best_and_keep_last(tmp_path):
    run = tmp_path / "checkpoints" / "r"
    for epoch in range(5):
        save_checkpoint(state(epoch), run, epoch, is_best=epoch in (0, 2), keep_last=2)
    assert [p.name for p in epoch_files(run)] == ["model_003.pt", "model_004.pt"]
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 4
    assert load_checkpoint(run / "model_003.pt")["epoch"] == 3  # not changed by later writes of checkpoint.pt
    assert load_checkpoint(run / "best.pt")["epoch"] == 2
    assert not list(run.glob(".*tmp*"))


def test_keep_all_by_default(tmp_path):
    for epoch in range(3):
        save_checkpoint(state(epoch), tmp_path, epoch, is_best=False)
    assert [p.name for p in epoch_files(tmp_path)] == ["model_000.pt", "model_001.pt", "model_002.pt"]
    assert not (tmp_path / "best.pt").exists()


def test_failed_write_keeps_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save(state(1), path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"x": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint there"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: not an rn50 checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    atomic_save({"format": FORMAT_VERSION, "model": {}, "rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == expected


def test_mid_epoch_saves_replace_the_latest_only_and_interrupted_writes_are_cleaned(tmp_path):
    save_checkpoint(state(0), tmp_path, 0, is_best=True)
    save_latest(state(7), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 7
    assert load_checkpoint(tmp_path / "model_000.pt")["epoch"] == 0
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 0
    # what SIGKILL in the middle of writes leaves: temporary files next to intact ones
    (tmp_path / ".checkpoint.pt.tmp-4242").write_bytes(b"half a checkpoint")
    (tmp_path / ".model_001.pt.tmp-4242").write_bytes(b"")
    removed = remove_unfinished(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.tmp-4242", ".model_001.pt.tmp-4242"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint.pt", "model_000.pt"]
