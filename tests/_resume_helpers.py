"""Shared by the resume and signal tests: a tiny deterministic run, killed runs in subprocesses, and the comparison
of two runs' final states bit for bit.

The runs use one CPU thread everywhere (the subprocesses through OMP_NUM_THREADS, the in-process references through
torch.set_num_threads): on 2 shared cores two OpenMP threads are many times slower, and bit-identity on the CPU is
promised for a fixed thread count (the checkpoint records it under --deterministic).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "tests" / "_resume_runner.py"

# ResNet-18 at 32 px on the synth fixtures (photo-like, 64 train / 16 val images: flat-colour images would hide a
# crop that differs): batch 8 with 2-step accumulation makes 4 optimizer steps per epoch; every batch augmentation
# and the EMA are on, so the per-batch seeds and the EMA state are part of what must survive a kill.
TINY = {
    "loader": "torchvision",
    "arch": "resnet18",
    "res": 32,
    "val_res": 32,
    "batch_size": 8,
    "grad_accum": 2,
    "workers": 0,
    "epochs": 2,
    "max_lr": 0.05,
    "precision": "fp32",
    "progress": False,
    "log_every": 2,
    "deterministic": True,
    "checkpoint_every": 1,
    "ema": True,
    "ema_decay": 0.9,
    "mixup": 0.2,
    "cutmix": 1.0,
    "random_erase": 0.25,
    "auto_augment": "trivialaugment",
}

_CACHE: dict[str, Path] = {}


def flags(data: Path, out: Path, run: str = "r", **overrides) -> list[str]:
    argv = ["--data-dir", str(data), "--output-dir", str(out), "--run-name", run]
    for key, value in {**TINY, **overrides}.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(name if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            argv += [name, str(value)]
    return argv


def run_in_process(argv: list[str]) -> int:
    from training.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def reference(key: str, data: Path, tmp_path_factory, **overrides) -> Path:
    """Output dir of an uninterrupted run (made once per session per key)."""
    if key not in _CACHE:
        out = tmp_path_factory.mktemp(f"reference_{key}")
        assert run_in_process(flags(data, out, **overrides)) == 0
        _CACHE[key] = out
    return _CACHE[key]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_killed(
    argv: list[str], event: str = "none", n: int = 0, sig: str = "KILL", timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run the trainer in a subprocess that sends itself `sig` at the n-th `event` (see _resume_runner)."""
    spec = json.dumps({"event": event, "n": n, "signal": sig})
    return subprocess.run(
        [sys.executable, str(RUNNER), spec, "--", *argv],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=timeout,
    )


def killed_by(r: subprocess.CompletedProcess, sig: int = signal.SIGKILL) -> bool:
    return r.returncode == -sig


def latest(out: Path, run: str = "r") -> dict:
    from training.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoints" / run / "checkpoint.pt")


def records(out: Path, run: str = "r") -> list[dict]:
    return json.loads((out / "logs" / run / "training_log.json").read_text())


LOGGED = (
    "epoch",
    "train_loss",
    "train_top1",
    "val_loss",
    "val_top1",
    "val_top5",
    "ema_top1",
    "lr",
    "res",
    "step",
    "val_samples",
)


def assert_same_final_state(expected: Path, actual: Path, run: str = "r") -> None:
    """Weights, EMA, optimizer, scaler, schedule and step bit for bit; the logged metrics of every epoch equal."""
    a, b = latest(expected, run), latest(actual, run)
    assert (b["phase"], b["step"], b["next_epoch"]) == (a["phase"], a["step"], a["next_epoch"])
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"model {k} differs"
    if a["ema"] is not None:
        assert a["ema"]["updates"] == b["ema"]["updates"]
        for k in a["ema"]["module"]:
            assert torch.equal(a["ema"]["module"][k], b["ema"]["module"][k]), f"EMA {k} differs"
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"]), pid
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["scaler"] == b["scaler"] and a["scheduler"] == b["scheduler"]
    ra, rb = records(expected, run), records(actual, run)
    assert [{k: r[k] for k in LOGGED} for r in rb] == [{k: r[k] for k in LOGGED} for r in ra]
