"""Plain state dicts: the weights that come in (`rn50 eval --weights`) and go out (`rn50 export`).

A plain state dict is {key: tensor} as `torchvision.models.<arch>().state_dict()` has it: torchvision's published
weights, timm's ResNets (same keys), an `rn50 export` folder's weights.pt. Runs with BlurPool add the blur layers:
`<conv>.weight` becomes `<conv>.conv.weight` beside `<conv>.blur_filter` at every strided convolution after the stem.

Every problem is a WeightsError whose message is one line naming the file and what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# blocks per stage and block kind of torchvision's ResNets: what a state dict's keys say about its arch
_STAGES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")
# prefixes of wrapped modules (DDP, torch.compile) that some tools leave in the keys they save
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class WeightsError(ValueError):
    """A weights file that cannot be used as asked; the message names the file and the fix."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The {key: tensor} of a weights file written with torch.save (read with weights_only=True: no pickled code).

    Accepted: a plain state dict, or one under "state_dict" or "model" (how many training scripts save theirs), with
    DDP's `module.` or torch.compile's `_orig_mod.` prefixes removed. An rn50 checkpoint is refused with the flag
    that reads it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such file (a state dict saved with torch.save, e.g. an rn50 export's weights.pt)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated zip, a pickle of classes, random bytes: one answer to the user
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise WeightsError(
            f"{path}: not a readable state dict, damaged or truncated or not written by torch.save "
            f"({type(e).__name__}: {first}); download or copy it again"
        ) from None
    if isinstance(obj, dict) and "format" in obj and "optimizer" in obj and "model" in obj:
        raise WeightsError(f"{path}: an rn50 checkpoint, not a plain state dict; pass it as --checkpoint {path}")
    if isinstance(obj, dict) and not _all_tensors(obj):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict) and _all_tensors(obj[key]):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        raise WeightsError(
            f"{path}: not a state dict ({{name: tensor}}); save one with torch.save(model.state_dict(), FILE)"
        )
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def has_blurpool(state: dict[str, torch.Tensor]) -> bool:
    """True for the weights of a BlurPool model (training.model.BlurPoolConv2d's fixed filters are in the dict)."""
    return any(k.endswith(".blur_filter") for k in state)


def num_classes_of(state: dict[str, torch.Tensor], path: str | Path) -> int:
    """The class count of the classifier (`fc.weight` is classes x features)."""
    w = state.get("fc.weight")
    if w is None or w.ndim != 2:
        raise WeightsError(f"{path}: no fc.weight of shape (classes, features); not a torchvision-style ResNet")
    return int(w.shape[0])


def guess_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The torchvision ResNet whose block layout the keys have, or None."""
    blocks = [0, 0, 0, 0]
    for key in state:
        m = _BLOCK.match(key)
        if m:
            stage, index = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], index + 1)
    kind = "bottleneck" if "layer1.0.conv3.weight" in state or "layer1.0.conv3.conv.weight" in state else "basic"
    for arch, (k, stages) in _STAGES.items():
        if k == kind and tuple(blocks) == stages:
            return arch
    return None


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Raise a WeightsError naming the missing and unexpected keys and the differing shapes unless `state` loads into
    `model` exactly. what: how the model was asked for ("resnet50 with 1000 classes")."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shapes differ, file vs model ({_few(shapes)})")
    guess = guess_arch(state)
    hint = f"; the keys are those of a {guess}: pass --arch {guess}" if guess and guess not in what.split() else ""
    raise WeightsError(f"{path}: not the weights of {what}: {'; '.join(parts)}{hint}")


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    check_fits(model, state, path, what)
    model.load_state_dict(state)
    return model
