"""Launch scripts: valid bash, and the commands they would run parse as trainer flags with real presets."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from training.config import preset_path
from training.train import build_parser

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["ec2_setup.sh", "train_8gpu.sh", "train_t4_budget.sh", "multinode.sh", "_launch.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
    r = subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    r = subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", **env},
        cwd="/",
    )
    assert r.returncode == 0, r.stderr
    return shlex.split(r.stdout)


def trainer_flags(cmd: list[str]) -> list[str]:
    """The part of a launch command that the trainer's parser sees."""
    if "-m" in cmd:
        return cmd[cmd.index("-m") + 2 :]
    return cmd[cmd.index("train") + 1 :]


def test_train_8gpu_command(tmp_path):
    cmd = dry_run("train_8gpu.sh", "/data/b", "16", "--compile", NGPU="4", OUT=str(tmp_path))
    assert cmd[1:3] == ["--standalone", "--nproc_per_node"] and cmd[3] == "4"
    # a worker that fails is restarted by torchrun, with the same command line: --resume auto makes it continue
    assert cmd[cmd.index("--max-restarts") + 1] == "2"
    args = build_parser().parse_args(trainer_flags(cmd))
    assert preset_path(args.config).name == "rn50_8xa100_16ep.yaml"
    assert args.step == "compile" and args.data_dir == "/data/b" and args.resume == "auto"
    no_restarts = dry_run("train_8gpu.sh", "/data/b", NGPU="4", MAX_RESTARTS="0")
    assert no_restarts[no_restarts.index("--max-restarts") + 1] == "0"
    bad = subprocess.run(
        ["bash", str(REPO / "scripts" / "train_8gpu.sh"), "/data/b", "17"],
        capture_output=True,
        text=True,
        env={**os.environ, "DRY_RUN": "1", "NGPU": "8"},
    )
    assert bad.returncode == 2 and "16, 24, 32, 40, 56 or 88" in bad.stderr


def test_t4_and_multinode_commands():
    t4 = build_parser().parse_args(trainer_flags(dry_run("train_t4_budget.sh", "/data/b", "--batch-size", "192")))
    assert preset_path(t4.config).name == "t4_budget.yaml" and t4.batch_size == 192 and t4.resume == "auto"
    cmd = dry_run("multinode.sh", "/data/b", "88", NNODES="2", MASTER_ADDR="node0", GPUS="8")
    assert "--rdzv_endpoint" in cmd and cmd[cmd.index("--rdzv_endpoint") + 1] == "node0:29500"
    assert cmd[cmd.index("--nnodes") + 1] == "2"
    args = build_parser().parse_args(trainer_flags(cmd))
    assert preset_path(args.config).name == "rn50_8xa100_88ep.yaml"
