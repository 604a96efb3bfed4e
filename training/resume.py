"""The checks that a checkpoint fits this run, made before anything is loaded (training.checkpoint holds the format).

Refusal rules: every check runs before any tensor is copied into the model, so a checkpoint is either loaded whole
or not at all. A different architecture, class list or tensor shape is refused. A mid-epoch position is refused when
the number of ranks, the batch size, the accumulation, the seed, the sample order (--loader-order) or the dataset
size differ, because the rest of the epoch would then be cut into other shards (samples repeated or skipped); at
epoch boundaries those may change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.checkpoint import Checkpoint, epoch_file


class ResumeError(ValueError):
    """The checkpoint cannot continue this run; the message names the file and the fix."""


def _fix(path: Path) -> str:
    return f"start a new --run-name, or delete {path.parent} to start this run over"


def _check_tensors(what: str, saved: object, built: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ResumeError(f"{path}: its {what} is not a dict of tensors (damaged?); {_fix(path)}")
    missing = [k for k in built if k not in saved]
    extra = [k for k in saved if k not in built]
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}" if missing else "",
                f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}" if extra else "",
            )
            if part
        )
        raise ResumeError(
            f"{path}: its {what} does not fit this run's {arch} ({detail}; another --arch or --blurpool?); {_fix(path)}"
        )
    for k, t in built.items():
        s = saved[k]
        if s.shape != t.shape or s.dtype != t.dtype:
            raise ResumeError(
                f"{path}: its {what} does not fit this run's {arch} ({k}: saved {tuple(s.shape)} "
                f"{str(s.dtype).replace('torch.', '')}, built {tuple(t.shape)} "
                f"{str(t.dtype).replace('torch.', '')}); {_fix(path)}"
            )


def check_compatible(
    ckpt: Checkpoint,
    *,
    arch: str,
    classes: list[str],
    data_dir: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_module: torch.nn.Module | None,
) -> None:
    """Raise ResumeError unless every part of the checkpoint fits the objects this run built (nothing is modified)."""
    path = ckpt.path
    problem = ckpt.incomplete()
    if problem:
        raise ResumeError(f"{path}: {problem}; {_fix(path)}")
    saved_arch = ckpt.config.get("arch")
    if saved_arch and saved_arch != arch:
        raise ResumeError(
            f"{path}: holds a {saved_arch}, this run builds a {arch}; resume with --arch {saved_arch}, or {_fix(path)}"
        )
    saved_classes = ckpt.classes
    if saved_classes and saved_classes != classes:
        how = (
            f"{len(saved_classes)} classes, {data_dir} has {len(classes)}"
            if len(saved_classes) != len(classes)
            else f"classes that {data_dir} names or orders differently"
        )
        raise ResumeError(f"{path}: the run was trained on {how}; resume with the run's --data-dir, or {_fix(path)}")
    _check_tensors("model", ckpt.weights(), model.state_dict(), path, arch)
    saved_opt, built_opt = ckpt.optimizer, optimizer.state_dict()
    if not isinstance(saved_opt, dict) or not isinstance(saved_opt.get("param_groups"), list):
        raise ResumeError(f"{path}: its optimizer state is not an SGD state dict (damaged?); {_fix(path)}")
    sizes = [len(g.get("params", [])) for g in saved_opt["param_groups"]]
    if sizes != [len(g["params"]) for g in built_opt["param_groups"]]:
        raise ResumeError(
            f"{path}: its optimizer has parameter groups of sizes {sizes}, this run "
            f"{[len(g['params']) for g in built_opt['param_groups']]} (another weight-decay split or "
            f"model); {_fix(path)}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, st in (saved_opt.get("state") or {}).items():
        buf = st.get("momentum_buffer") if isinstance(st, dict) else None
        if (
            not isinstance(pid, int)
            or not 0 <= pid < len(params)
            or (buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != params[pid].shape))
        ):
            raise ResumeError(
                f"{path}: its optimizer state does not fit this run's parameters (entry {pid}); {_fix(path)}"
            )
    if ema_module is not None and ckpt.ema is not None:
        ema = ckpt.ema
        if not isinstance(ema, dict) or "module" not in ema:
            raise ResumeError(f"{path}: its EMA entry is damaged; {_fix(path)}")
        _check_tensors("EMA", ema["module"], ema_module.state_dict(), path, arch)


def check_position(
    ckpt: Checkpoint,
    *,
    world_size: int,
    batch_size: int,
    grad_accum: int,
    seed: int,
    num_samples: int,
    order: str = "random",
) -> list[str]:
    """Refuse a mid-epoch position that this run would shard differently; return warnings for changes that are
    harmless at an epoch boundary."""
    phase, loader, path = ckpt.phase, ckpt.loader, ckpt.path
    ours = {
        "world_size": world_size,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "seed": seed,
        "num_samples": num_samples,
        "order": order,
    }
    changed = {k: (loader[k], v) for k, v in ours.items() if k in loader and loader[k] != v}
    if not changed:
        return []
    if phase == "mid_epoch":
        epoch = ckpt.finished_epoch + 1
        previous = path.with_name(epoch_file(epoch - 1))
        alt = (
            f", or copy {previous.name} over {path.name} to resume from the start of epoch {epoch}"
            if previous.is_file()
            else ""
        )
        text = ", ".join(f"{k} {a} (now {b})" for k, (a, b) in changed.items())
        raise ResumeError(
            f"{path}: written in the middle of epoch {epoch} with {text}; the rest of that epoch would "
            "be sharded differently (samples repeated or skipped). Resume with the same number of "
            f"processes, --batch-size, --grad-accum, --seed, --loader-order and dataset{alt}"
        )
    text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
    return [f"resuming at an epoch boundary with {text}: the next epochs follow the new setting"]
