"""The `rn50` console script: one entry, subcommands that live in the package they belong to.

Each subcommand is a module with `main(argv) -> int`; it is imported only when called, so `rn50 synth` does not pay
for importing torch, and `rn50 --help` is instant.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). The module's own argparse parser documents the flags.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("dataset_tools.synth", "write a learnable ImageNet-layout folder of generated JPEGs"),
    "organize-val": ("dataset_tools.organize_val", "sort the flat ILSVRC2012 val images into class folders"),
    "convert": ("dataset_tools.convert", "write an ImageNet folder to FFCV .beton files"),
    "inspect": ("dataset_tools.inspect_beton", "summarise a .beton and draw a grid of its images"),
    "bench": ("benchmarks.cli", "benchmarks: loader | step | keepup | convert"),
    "doctor": ("benchmarks.doctor", "check this machine and dataset; recommend loader settings"),
    "train": ("training.train", "train a ResNet (1 GPU, torchrun for N GPUs/nodes, or CPU)"),
    "lr-find": ("training.lr_finder", "LR range test: plot and suggested max LR"),
    "eval": ("training.evaluate", "top-1/top-5 of a checkpoint on the val split"),
    "show-batch": ("pipeline.show_batch", "save a picture of one training batch with class names"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rn50 COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "rn50 COMMAND --help shows the flags of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"rn50: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
