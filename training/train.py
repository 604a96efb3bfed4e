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

from training.config import ConfigError, Parser, TrainConfig, add_config_flags, resolve
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
    """The config (training.config.resolve: defaults < saved config of a resumed run < --config preset < typed
    flags), then the cheap checks, which also fix num_classes from the data. Raises ConfigError or DataError with a
    one-line message."""
    cfg = resolve(args)
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
