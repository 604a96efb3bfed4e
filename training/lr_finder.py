"""`rn50 lr-find`: the LR range test (Smith 2015; fastai's lr_find) with the training run's own model, loader,
precision and train step.

    rn50 lr-find --data-dir /data/betons --config t4_budget --num-iter 200
    torchrun --standalone --nproc_per_node 8 -m training.lr_finder --config rn50_8xa100_40ep --data-dir /data/betons

The LR grows exponentially from --start-lr to --end-lr over --num-iter optimizer steps; the loss is smoothed with a
bias-corrected exponential moving average, and the sweep stops early once the smoothed loss exceeds --diverge times
its minimum. Writes, under --output-dir:
    lr_finder_plots/lr_finder_<run>.png   loss and smoothed loss against the LR (log scale), suggestions marked
    lr_suggestion_<run>.json              suggested_max_lr (+ the curve, the other candidates and the setup)

suggested_max_lr follows Smith's rule for the 1cycle policy: the largest LR at which the smoothed loss still falls,
i.e. the LR at its minimum (OneCycle starts at max_lr / div_factor and warms up to it, which is what makes such a
high peak trainable). conservative_max_lr, a tenth of it, is fastai's "one order of magnitude before the minimum".
The sweep is short and noisy on small data: read the plot, not only the number. The LR is for the global batch the
sweep used (batch size x GPUs x accumulation); the JSON records it, so rescale linearly for another global batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataset_tools.files import check_writable
from training.config import ConfigError, Parser, TrainConfig, add_config_flags, resolve
from training.preflight import DataError, check_data

PROG = "rn50 lr-find"
# training-run flags that mean nothing to a sweep
_SKIP = (
    "resume",
    "keep_last",
    "stop_after_epoch",
    "ema",
    "ema_decay",
    "tta",
    "val_res",
    "val_batch_size",
    "lr_schedule",
    "pct_start",
    "div_factor",
    "final_div_factor",
    "cycle_momentum",
    "base_momentum",
    "max_momentum",
    "lr_peak_epoch",
    "warmup_epochs",
    "step_epochs",
    "step_gamma",
    "max_lr",
    "lr_ref_batch",
    "epochs",
    "log_every",
    "checkpoint_every",
    "checkpoint_minutes",
    "deterministic",
)


@dataclass(frozen=True)
class ExponentialSweep:
    """Duck-types training.schedules.Schedule for train_step: lr_i = start * (end / start) ** (i / (n - 1))."""

    start_lr: float
    end_lr: float
    num_iter: int

    def lr_at(self, step: int) -> float:
        return self.start_lr * (self.end_lr / self.start_lr) ** (step / max(self.num_iter - 1, 1))

    def momentum_at(self, step: int) -> None:
        return None


def smooth(losses: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (the first values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def diverged(smoothed: list[float], factor: float) -> bool:
    """True once the latest smoothed loss is not finite or exceeds `factor` times the best so far."""
    last = smoothed[-1]
    return not math.isfinite(last) or (len(smoothed) > 1 and last > factor * min(smoothed))


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 5) -> dict:
    """Candidates from the smoothed curve after its first `skip_start` points (where the average is still mostly
    the first losses): suggested_max_lr = the LR at its minimum, conservative_max_lr = a tenth of that, and the LR
    of steepest descent (most negative slope per log-LR, up to the minimum)."""
    lr = np.asarray(lrs, dtype=np.float64)
    sm = np.asarray(smoothed, dtype=np.float64)
    if np.isfinite(sm).sum() < 3:
        raise ValueError("the sweep has fewer than 3 finite losses; raise --num-iter or lower --start-lr")
    lo = skip_start if np.isfinite(sm[skip_start:]).sum() >= 3 else 0
    masked = np.where(np.isfinite(sm), sm, np.inf)
    i_min = lo + int(np.argmin(masked[lo:]))
    if i_min - lo >= 1:
        grads = np.gradient(sm[lo : i_min + 1], np.log(lr[lo : i_min + 1]))
        steepest = float(lr[lo + int(np.argmin(grads))])
    else:
        steepest = float(lr[i_min])
    return {
        "suggested_max_lr": float(lr[i_min]),
        "conservative_max_lr": float(lr[i_min] / 10),
        "lr_at_min_loss": float(lr[i_min]),
        "steepest_lr": steepest,
        "min_smoothed_loss": float(sm[i_min]),
    }


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--start-lr", type=float, default=1e-5, help="first LR (default 1e-5)")
    g.add_argument("--end-lr", type=float, default=10.0, help="last LR (default 10)")
    g.add_argument("--num-iter", type=int, default=100, help="optimizer steps in the sweep (default 100)")
    g.add_argument("--smooth", type=float, default=0.98, help="EMA factor of the smoothed loss (default 0.98)")
    g.add_argument(
        "--diverge",
        type=float,
        default=4.0,
        help="stop when the smoothed loss exceeds this times its minimum (default 4)",
    )
    add_config_flags(p, skip=_SKIP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve(args)
        problems = cfg.validate()
        if not 0 < args.start_lr < args.end_lr:
            problems.append("need 0 < --start-lr < --end-lr")
        if args.num_iter < 5:
            problems.append("--num-iter must be >= 5")
        if not 0 <= args.smooth < 1:
            problems.append("--smooth must be in [0, 1)")
        if args.diverge <= 1:
            problems.append("--diverge must be > 1")
        if problems:
            raise ConfigError("; ".join(problems))
        check_data(cfg)
        try:  # the sweep's results go there: find out now, not after the sweep
            check_writable(Path(cfg.output_dir) / "lr_finder_plots" / "probe.png")
        except OSError as e:
            raise DataError(f"--output-dir {cfg.output_dir}: cannot write there ({e.strerror or e})") from None
    except (ConfigError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sweep = ExponentialSweep(args.start_lr, args.end_lr, args.num_iter)
    return run_sweep(cfg, sweep, args.smooth, args.diverge)


def run_sweep(cfg: TrainConfig, sweep: ExponentialSweep, beta: float, diverge_factor: float) -> int:
    from training.components import make_loader, make_parts, seed_everything
    from training.distributed import DeviceError, cleanup, init_distributed
    from training.engine import resolve_precision
    from training.schedules import train_resolution

    try:
        ctx = init_distributed(cfg.device)
    except DeviceError as e:
        print(f"rn50 lr-find: error: {e}", file=sys.stderr)
        return 2
    try:
        seed_everything(cfg.seed, ctx.rank)
        precision = resolve_precision(cfg.precision, ctx.device)
        res = train_resolution(cfg, 0)
        loader = make_loader(cfg, "train", ctx, precision.input_dtype, resolution=res)
        parts, _, _ = make_parts(cfg, loader.num_classes, ctx, precision, sweep)
        t0 = time.perf_counter()
        curve = sweep_losses(parts, loader, ctx, cfg, sweep, beta, diverge_factor)
        if not ctx.is_main:
            return 0
        setup = {"precision": precision.name, "res": res, "loader": loader.backend, "world_size": ctx.world_size}
        return report(cfg, sweep, curve, setup, beta, diverge_factor, time.perf_counter() - t0)
    finally:
        cleanup()


@dataclass
class Curve:
    """What a sweep measured: the LR and (all ranks') loss of each step, the smoothed loss, and whether it stopped
    early because the loss diverged."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    stopped_early: bool = False


def sweep_losses(parts, loader, ctx, cfg: TrainConfig, sweep: ExponentialSweep, beta: float, diverge: float) -> Curve:
    """The sweep: the run's train step at each LR of `sweep`, over as many epochs of the loader as it takes, in the
    trainer's micro-batches (without the augmentation recipe); stops early when the smoothed loss diverges."""
    import torch

    from training.distributed import all_reduce_sum
    from training.engine import micro_batches, train_step

    def epochs():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    parts.model.train()
    curve = Curve()
    for step, micro in zip(range(sweep.num_iter), micro_batches(epochs(), cfg.grad_accum)):
        loss_sum, _, n, lr = train_step(parts, micro, step, ctx.device)
        stats = all_reduce_sum(
            torch.stack([loss_sum.double(), torch.tensor(float(n), device=ctx.device, dtype=torch.float64)]), ctx
        )
        loss = (stats[0] / stats[1]).item()  # a sync per step: the sweep needs every loss
        curve.lrs.append(lr)
        curve.losses.append(loss)
        curve.smoothed = smooth(curve.losses, beta)
        if ctx.is_main and cfg.progress and (step % max(1, sweep.num_iter // 20) == 0):
            print(f"  step {step:4d}  lr {lr:.3e}  loss {loss:.4f}  smoothed {curve.smoothed[-1]:.4f}", flush=True)
        if diverged(curve.smoothed, diverge):
            curve.stopped_early = True
            break
    return curve


def report(
    cfg: TrainConfig, sweep: ExponentialSweep, curve: Curve, setup: dict, beta: float, diverge: float, seconds: float
) -> int:
    """Rank 0: the suggestion on screen, then the JSON and the plot."""
    from training.plots import plot_lr_finder

    try:
        suggestion = suggest(curve.lrs, curve.smoothed)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    run = cfg.run_name or f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.output_dir)
    global_batch = cfg.batch_size * setup["world_size"] * cfg.grad_accum
    result = {
        **suggestion,
        "run_name": run,
        "global_batch": global_batch,
        "batch_size": cfg.batch_size,
        "world_size": setup["world_size"],
        "grad_accum": cfg.grad_accum,
        "arch": cfg.arch,
        "precision": setup["precision"],
        "res": setup["res"],
        "data_dir": cfg.data_dir,
        "loader": setup["loader"],
        "start_lr": sweep.start_lr,
        "end_lr": sweep.end_lr,
        "num_iter": sweep.num_iter,
        "iterations_run": len(curve.lrs),
        "stopped_early": curve.stopped_early,
        "smooth": beta,
        "diverge": diverge,
        "seconds": seconds,
        "lrs": curve.lrs,
        "losses": curve.losses,
        "smoothed": curve.smoothed,
    }
    json_path = out / f"lr_suggestion_{run}.json"
    print(f"suggested_max_lr {suggestion['suggested_max_lr']:.6g}", flush=True)  # on screen before any write
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
        png = plot_lr_finder(
            curve.lrs, curve.losses, curve.smoothed, suggestion, out / "lr_finder_plots" / f"lr_finder_{run}.png", run
        )
    except OSError as e:
        where = e.filename or out
        print(f"{PROG}: error: could not write {where} ({e.strerror or e}); the suggestion is above", file=sys.stderr)
        return 1
    stopped = " (stopped: loss diverged)" if curve.stopped_early else ""
    print(
        f"LR range test: {len(curve.lrs)} steps{stopped} in {seconds:.0f} s at global batch {global_batch}\n"
        + summary(suggestion)
        + f"\n  plot: {png}\n  json: {json_path}",
        flush=True,
    )
    return 0


def summary(suggestion: dict) -> str:
    return (
        f"  min smoothed loss {suggestion['min_smoothed_loss']:.4f} at LR {suggestion['lr_at_min_loss']:.3g}; "
        f"steepest descent at LR {suggestion['steepest_lr']:.3g}\n"
        f"  suggested_max_lr {suggestion['suggested_max_lr']:.3g} (conservative: "
        f"{suggestion['conservative_max_lr']:.3g})  -> rn50 train ... --max-lr {suggestion['suggested_max_lr']:.3g}"
    )


if __name__ == "__main__":
    sys.exit(main())
