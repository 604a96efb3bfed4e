"""`rn50 train`: train a ResNet on ImageNet-layout data, on one GPU, N GPUs, several nodes or the CPU.

    rn50 train --data-dir /data/betons --config t4_budget                      # one GPU (or CPU)
    torchrun --standalone --nproc_per_node 8 -m training --config rn50_8xa100_40ep --data-dir /data/betons
    rn50 train --run-name my-run --resume                                       # continue where it stopped
    torchrun --max-restarts 3 ... -m training --run-name R --resume auto --checkpoint-every 500   # spot-safe

The same code runs with and without torchrun; --batch-size is per GPU. Outputs under --output-dir (default .):
logs/<run>/ (training_log.md/.json, loss/accuracy/lr .png, config.yaml), runs/<run>/ (TensorBoard),
checkpoints/<run>/ (checkpoint.pt, model_XXX.pt, best.pt). Flags override the --config preset; every flag is also a
YAML key (--max-lr -> max_lr).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.config import ConfigError, Parser, TrainConfig, add_config_flags, from_dict, load_yaml, resolve
from training.preflight import DataError, check_data, page_cache_advice

PROG = "rn50 train"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    return p


def run_dir(cfg: TrainConfig, kind: str) -> Path:
    return Path(cfg.output_dir) / kind / cfg.run_name


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved config of a resumed run < --config preset < typed flags; then the cheap checks.
    Raises ConfigError or DataError with a one-line message.

    --resume auto continues the run when checkpoints/<run>/checkpoint.pt exists and starts it otherwise, so the
    same command line serves the first launch and every restart (torchrun --max-restarts, a spot job re-queued)."""
    base = None
    mode = getattr(args, "resume", "no")
    if mode != "no":
        if not getattr(args, "run_name", ""):
            raise ConfigError(f"--resume {mode} needs --run-name (the run to continue)")
        probe = TrainConfig(run_name=args.run_name, output_dir=getattr(args, "output_dir", "."))
        saved = run_dir(probe, "checkpoints") / "config.yaml"
        latest = saved.with_name("checkpoint.pt")
        if mode == "yes" or latest.is_file():
            if not saved.is_file():
                raise ConfigError(f"--resume: {saved} not found; is --output-dir the one the run used? (runs there: "
                                  f"{', '.join(sorted(p.name for p in saved.parents[1].glob('*'))) or 'none'})")
            if not latest.is_file():
                raise ConfigError(f"--resume: {latest} not found: run {args.run_name!r} stopped before its first "
                                  "checkpoint; start it again with --resume auto (or without --resume)")
            base = from_dict(load_yaml(saved), str(saved))
    cfg = resolve(args, base)
    problems = cfg.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    check_data(cfg)
    advice = page_cache_advice(cfg)
    if advice and int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: {advice}", file=sys.stderr)
    if cfg.run_name and cfg.resume == "no" and (run_dir(cfg, "checkpoints") / "checkpoint.pt").exists():
        raise ConfigError(f"run {cfg.run_name!r} already has {run_dir(cfg, 'checkpoints') / 'checkpoint.pt'}; "
                          "pass --resume to continue it, or choose another --run-name")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except (ConfigError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from training.trainer import train  # torch and the loaders: imported only once the arguments are known good

    if argv is None:
        argv = sys.argv[1:]
        launcher = "torchrun -m training" if "LOCAL_RANK" in os.environ else (
            "python -m training" if sys.argv[0].endswith("__main__.py") else PROG)
    else:
        launcher = PROG
    return train(cfg, argv=[launcher, *argv])


if __name__ == "__main__":
    sys.exit(main())
