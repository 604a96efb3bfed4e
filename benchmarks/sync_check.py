"""`rn50 bench sync` (= `python -m benchmarks.sync_check`): prove on a GPU that a training step never waits for the
device.

    rn50 bench sync                                   # bf16 and fp16, eager / compile / graphs steps
    rn50 bench sync --precision fp16 --steps eager --arch resnet50 --res 224

Every augmentation is on (AutoAugment's ImageNet policy, random erasing, MixUp and CutMix), as is the EMA. For each
(precision, step mode) it runs a few warm-up steps (compilation and graph capture happen there), then a few more with
`torch.cuda.set_sync_debug_mode("error")`: any operation that makes the host wait for the GPU -- a blocking copy, an
.item(), a synchronize -- raises, and the check names it. Batches are made on the device beforehand, so what is
checked is the step: the augmentation recipe, forward, backward, the optimizer (with fp16's GradScaler) and the EMA.
The CPU tests check the same code on the meta device (tests/test_step.py, tests/test_augment.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

STEP_MODES = ("eager", "compile", "graphs")
COVERS = (
    "torch.cuda.set_sync_debug_mode('error'): calls that make the host wait for the GPU through the CUDA runtime as "
    "torch calls it (synchronize, blocking copies, .item()). Not covered: CUDA event waits, DALI's and FFCV's own "
    "waits inside their threads, copies from pageable memory issued outside torch."
)


def check(precision: str, mode: str, arch: str, res: int, batch: int, steps: int, warmup: int) -> dict:
    import torch

    from pipeline.augment import Recipe
    from training.components import make_parts
    from training.config import TrainConfig
    from training.distributed import DistContext
    from training.engine import resolve_precision, train_step
    from training.model import sgd_kernels
    from training.schedules import Schedule

    device = torch.device("cuda", torch.cuda.current_device())
    prec = resolve_precision(precision, device)
    cfg = TrainConfig(arch=arch, step=mode, ema=True, ema_decay=0.999)
    schedule = Schedule(kind="onecycle", max_lr=0.1, steps_per_epoch=100, epochs=1, cycle_momentum=True)
    parts, _, _ = make_parts(cfg, 1000, DistContext(0, 0, 1, device), prec, schedule)
    recipe = Recipe(1000, policy="autoaugment", random_erase=0.25, mixup=0.2, cutmix=1.0)
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, res, res, device=device, generator=gen).to(prec.input_dtype)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), device=device, generator=gen)

    def step(i: int) -> None:
        x, y = recipe(images, labels, epoch=0, batch=i)
        train_step(parts, [(x, y)], i, device)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize(device)
    result = {
        "precision": prec.name,
        "requested": mode,
        "mode": parts.step_mode,
        "why": parts.step_why,
        "sgd": sgd_kernels(parts.optimizer),
        "steps": steps,
    }
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(warmup, warmup + steps):
            step(i)
        result["synchronisations"] = 0
    except RuntimeError as e:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
        where = f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else "?"
        result.update(synchronisations=1, error=str(e).splitlines()[0], where=where)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench sync",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--precision", default="bf16,fp16", help="comma-separated (bf16,fp16)")
    p.add_argument("--steps", default=",".join(STEP_MODES), help=f"step modes, of {', '.join(STEP_MODES)}")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--res", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--checked-steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=4, help="steps before the check (compilation, capture)")
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(
            "sync_check: error: needs a CUDA device (on the CPU, tests/test_step.py checks the step on the meta "
            "device)",
            file=sys.stderr,
        )
        return 2
    modes = [m for m in args.steps.split(",") if m]
    if any(m not in STEP_MODES for m in modes):
        print(f"sync_check: error: --steps takes {', '.join(STEP_MODES)}", file=sys.stderr)
        return 2
    from benchmarks.report import report_failure

    results = []
    for precision in [p for p in args.precision.split(",") if p]:
        for mode in modes:
            try:  # the warm-up (compilation, capture) included: one check failing keeps the others
                r = check(precision, mode, args.arch, args.res, args.batch_size, args.checked_steps, args.warmup)
                verdict = "no host sync" if not r["synchronisations"] else f"SYNC: {r['error']} at {r['where']}"
            except Exception as e:
                r = {"precision": precision, "requested": mode, "mode": mode, "sgd": "-", "synchronisations": None}
                r["failed"] = report_failure("sync_check", f"{precision} {mode}", e)
                verdict = f"FAILED: {r['failed']}"
            results.append(r)
            print(f"  {precision:5s} step {r['mode']:8s} SGD {r['sgd']:7s}: {verdict}", flush=True)
            if args.json:  # after every check: a later hang or crash loses nothing
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                record = {"gpu": torch.cuda.get_device_name(), "covers": COVERS, "results": results}
                Path(args.json).write_text(json.dumps(record, indent=1))
    return 0 if all(r["synchronisations"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
