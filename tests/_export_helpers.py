"""Runs and exports shared by the export and `eval --weights` tests (built once per session, on first use)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _train_helpers import argv

_CACHE: dict[str, object] = {}
PROJECT = ("training", "pipeline", "dataset_tools", "benchmarks")

# Loads every form an export folder holds in a process that cannot import this project: a finder at the front of
# sys.meta_path refuses its packages (the editable install would otherwise find them from any folder), and the
# interpreter runs isolated (-I: no PYTHONPATH, no script folder or cwd on sys.path).
FRESH_SCRIPT = r"""
import importlib.abc, importlib.util, json, sys
from pathlib import Path

PROJECT = {project!r}

class NoProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in PROJECT:
            raise ImportError(name + ": the exported model must not need the rn50 project")
        return None

sys.meta_path.insert(0, NoProject())
import torch, torchvision

batches = torch.load(sys.argv[1], weights_only=True)
out, report = {{}}, {{}}
for folder in sys.argv[3:]:
    folder = Path(folder)
    card = json.loads((folder / "model_card.json").read_text())
    classes = json.loads((folder / "classes.json").read_text())
    logits, forms = {{}}, []
    with torch.no_grad():
        program = torch.export.load(folder / "model.pt2").module()
        logits["pt2"] = {{k: program(x) for k, x in batches.items()}}
        forms.append("pt2")
        state = torch.load(folder / "weights.pt", weights_only=True)
        if not card["blurpool"]:
            model = getattr(torchvision.models, card["arch"])(num_classes=len(classes))
            model.load_state_dict(state)  # strict: every key, every shape
            model.eval()
            logits["torchvision"] = {{k: model(x) for k, x in batches.items()}}
            forms.append("torchvision")
        if importlib.util.find_spec("timm") is not None and not card["blurpool"]:
            import timm
            model = timm.create_model(card["arch"], pretrained=False, num_classes=len(classes))
            model.load_state_dict(state)
            model.eval()
            logits["timm"] = {{k: model(x) for k, x in batches.items()}}
            forms.append("timm")
    out[str(folder)] = logits
    report[str(folder)] = forms
torch.save(out, sys.argv[2])
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in PROJECT)
print(json.dumps({{"forms": report, "project_modules": loaded}}))
"""


def blurpool_run(tmp_path_factory, coded_root: Path) -> tuple[Path, Path]:
    """(output dir, best.pt) of a 1-epoch ResNet-18 + BlurPool run with flip TTA on the coded images (~10 s)."""
    if "blurpool" not in _CACHE:
        from training.train import main

        out = tmp_path_factory.mktemp("export_run")
        flags = argv(
            coded_root, out, "bp", epochs=1, res=32, val_res=48, batch_size=8, blurpool=True, tta=True, max_lr=0.05
        )
        assert main(flags) == 0
        _CACHE["blurpool"] = (out, out / "checkpoints" / "bp" / "best.pt")
    return _CACHE["blurpool"]  # type: ignore[return-value]


def without_blurpool(ckpt: Path, target: Path) -> Path:
    """A copy of a BlurPool run's checkpoint as a run without BlurPool writes it: the config says blurpool: false
    and the model's keys are torchvision's (each wrapped conv's weight back at `<conv>.weight`, no blur filters).
    The learned weights are kept, so the model is a different network than the BlurPool one, with real values."""
    from training.checkpoint import atomic_save, load_checkpoint

    state = load_checkpoint(ckpt)
    weights = {}
    for key, value in state["model"].items():
        if key.endswith(".blur_filter"):
            continue
        weights[key.removesuffix(".conv.weight") + ".weight" if _wrapped(key, state["model"]) else key] = value
    state["model"] = weights
    state["config"] = {**state["config"], "blurpool": False}
    atomic_save(state, target)
    return target


def _wrapped(key: str, model: dict) -> bool:
    return key.endswith(".conv.weight") and key.removesuffix(".conv.weight") + ".blur_filter" in model


def exported(tmp_path_factory, ckpt: Path, name: str) -> Path:
    """`rn50 export ckpt --out <tmp>/name`, once per session and name."""
    key = f"export:{name}"
    if key not in _CACHE:
        from training.export import main

        out = tmp_path_factory.mktemp("exports") / name
        assert main([str(ckpt), "--out", str(out)]) == 0
        _CACHE[key] = out
    return _CACHE[key]  # type: ignore[return-value]


def photo_batch(root: Path, resolution: int, count: int = 16) -> torch.Tensor:
    """The first `count` val images of an ImageNet-layout folder as a user would prepare them for the model card's
    preprocessing, with torchvision's transforms (no loader of this project): Resize + CenterCrop + normalise."""
    from PIL import Image
    from torchvision import transforms

    prepare = transforms.Compose(
        [
            transforms.Resize(round(resolution / 0.875)),
            transforms.CenterCrop(resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    files = sorted((root / "val").glob("*/*"))[:count]
    return torch.stack([prepare(Image.open(f).convert("RGB")) for f in files])


def checkpoint_model(ckpt: Path) -> torch.nn.Module:
    """The checkpoint's network as `rn50 eval` rebuilds it, in eval mode on the CPU."""
    from training.checkpoint import Checkpoint
    from training.config import from_dict
    from training.model import build_model

    saved = Checkpoint.read(ckpt)
    cfg = from_dict(saved.config)
    model = build_model(cfg.arch, len(saved.classes), blurpool=cfg.blurpool, channels_last=False)
    model.load_state_dict(saved.weights())
    return model.eval()


def logits_without_project(folders: list[Path], batches: dict[str, torch.Tensor], work: Path) -> tuple[dict, dict]:
    """({folder: {form: {batch name: logits}}}, report) from a fresh interpreter that cannot import this project,
    started outside the repository with no PYTHONPATH."""
    work.mkdir(parents=True, exist_ok=True)
    script = work / "load_exports.py"
    script.write_text(FRESH_SCRIPT.format(project=PROJECT))
    torch.save(batches, work / "batches.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(work / "batches.pt"), str(work / "logits.pt"), *map(str, folders)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return torch.load(work / "logits.pt", weights_only=True), report
