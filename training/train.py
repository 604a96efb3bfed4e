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
import dataclasses
import os
import sys

from training.config import (
    ConfigError,
    Parser,
    TrainConfig,
    add_config_flags,
    from_dict,
    load_yaml,
    resolve,
    run_name_problem,
)
from training.layout import RunPaths
from training.preflight import DataError, check_data, page_cache_advice

PROG = "rn50 train"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p)
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < saved config of a resumed run < --config preset < typed flags; then the cheap checks, which also
    fix num_classes from the data. Raises ConfigError or DataError with a one-line message.

    --resume auto continues the run when checkpoints/<run>/checkpoint.pt exists and starts it otherwise, so the
    same command line serves the first launch and every restart (torchrun --max-restarts, a spot job re-queued)."""
    base = None
    mode = getattr(args, "resume", "no")
    if mode != "no":
        if not getattr(args, "run_name", ""):
            raise ConfigError(f"--resume {mode} needs --run-name (the run to continue)")
        if run_name_problem(args.run_name):
            raise ConfigError(run_name_problem(args.run_name))
        paths = RunPaths(getattr(args, "output_dir", "."), args.run_name)
        saved, latest = paths.config, paths.latest
        if mode == "yes" or latest.is_file():
            if not saved.is_file():
                raise ConfigError(
                    f"--resume: {saved} not found; is --output-dir the one the run used? (runs there: "
                    f"{', '.join(sorted(p.name for p in saved.parents[1].glob('*'))) or 'none'})"
                )
            if not latest.is_file():
                raise ConfigError(
                    f"--resume: {latest} not found: run {args.run_name!r} stopped before its first "
                    "checkpoint; start it again with --resume auto (or without --resume)"
                )
            base = from_dict(load_yaml(saved), str(saved))
    cfg = resolve(args, base)
    problems = cfg.validate()
    if problems:
        raise ConfigError("; ".join(problems))
    cfg = dataclasses.replace(cfg, num_classes=check_data(cfg))
    advice = page_cache_advice(cfg)
    if advice and int(os.environ.get("RANK", "0")) == 0:
        print(f"{PROG}: {advice}", file=sys.stderr)
    if cfg.run_name and cfg.resume == "no" and RunPaths(cfg.output_dir, cfg.run_name).latest.exists():
        raise ConfigError(
            f"run {cfg.run_name!r} already has {RunPaths(cfg.output_dir, cfg.run_name).latest}; "
            "pass --resume to continue it, or choose another --run-name"
        )
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args)
    except (ConfigError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from training.trainer import train  # torch and the loaders: imported only once the arguments are known good

    return train(cfg, flags=sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
