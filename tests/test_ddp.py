"""Two processes under torchrun with gloo: the same entry point trains with DDP and the ranks stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two processes each importing torch on 2 cores
def test_two_process_ddp_keeps_ranks_identical(coded_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training",
        "--data-dir",
        str(coded_root),
        "--loader",
        "torchvision",
        "--arch",
        "resnet18",
        "--res",
        "16",
        "--val-res",
        "16",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--epochs",
        "2",
        "--max-lr",
        "0.05",
        "--precision",
        "fp32",
        "--no-progress",
        "--log-every",
        "2",
        "--output-dir",
        str(tmp_path),
        "--run-name",
        "ddp",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks hold different weights" not in r.stdout + r.stderr
    state = load_checkpoint(tmp_path / "checkpoints" / "ddp" / "checkpoint.pt")
    fingerprints = state["rank_weight_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert (
        len(state["rng"]) == 2
        and state["rng"][0]["numpy"]["keys"].tolist() != state["rng"][1]["numpy"]["keys"].tolist()
    )
    # 48 images, 2 ranks x 4 per step -> 6 steps per epoch, every rank on its own shard
    assert state["step"] == 12
    # only rank 0 wrote: one copy of every log file
    log = (tmp_path / "logs" / "ddp" / "training_log.md").read_text()
    assert "2 x CPU" in log and log.count("| Epoch |") == 1
    assert state["metrics"]["val_samples"] == 16  # every val image counted once across the two ranks
