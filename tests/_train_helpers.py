"""Small datasets and runs shared by the trainer's test modules (built once per session, on first use)."""

from __future__ import annotations

import json
from pathlib import Path

_CACHE: dict[str, object] = {}

# A run small enough for two CPU cores: ResNet-18 at 48 px; on learnable_data 10 steps of 16 images per epoch.
TINY = {
    "loader": "torchvision",
    "arch": "resnet18",
    "res": 48,
    "val_res": 48,
    "batch_size": 16,
    "workers": 0,
    "progress": False,
    "log_every": 3,
    "precision": "fp32",
}


def argv(data: Path, out: Path, run: str, **overrides) -> list[str]:
    """rn50 train flags for a tiny run; overrides use config names (res=32, ema=True, ...)."""
    flags = ["--data-dir", str(data), "--output-dir", str(out), "--run-name", run]
    for key, value in {**TINY, **overrides}.items():
        name = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(name if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [name, str(value)]
    return flags


def learnable_data(tmp_path_factory) -> Path:
    """4 classes of `rn50 synth` photos, 40 train + 10 val each, small so PIL decodes them fast."""
    if "learnable" not in _CACHE:
        from dataset_tools.synth import synthesize

        root = tmp_path_factory.mktemp("train_synth")
        synthesize(
            root,
            num_classes=4,
            train_per_class=40,
            val_per_class=10,
            seed=0,
            workers=1,
            min_short=56,
            max_short=80,
            progress=False,
        )
        _CACHE["learnable"] = root
    return _CACHE["learnable"]  # type: ignore[return-value]


def trained_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(data, output dir, run name) of a 5-epoch run on `learnable_data` (the learning-sanity run)."""
    if "trained" not in _CACHE:
        from training.train import main

        data = learnable_data(tmp_path_factory)
        out = tmp_path_factory.mktemp("trained_run")
        rc = main(argv(data, out, "learn", epochs=5, max_lr=0.05))
        assert rc == 0
        _CACHE["trained"] = (data, out, "learn")
    return _CACHE["trained"]  # type: ignore[return-value]


def records(out: Path, run: str) -> list[dict]:
    return json.loads((out / "logs" / run / "training_log.json").read_text())
