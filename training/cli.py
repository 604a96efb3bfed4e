"""The `rn50` console script: one command table; each command is a module's `main(argv) -> int`.

A module is imported only when its command runs, so `rn50 synth` does not pay for importing torch and `rn50 --help`
is instant. Two-word commands (`rn50 bench step`) sit in the same table as one-word ones.
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
    "show-batch": ("training.show_batch", "save a picture of one training batch, as the trainer sees it"),
    "lr-find": ("training.lr_finder", "LR range test: plot and suggested max LR"),
    "train": ("training.train", "train a ResNet (1 GPU, torchrun for N GPUs/nodes, or CPU)"),
    "eval": ("training.evaluate", "top-1/top-5 of a checkpoint (or a plain state dict: --weights) on the val split"),
    "export": ("training.export", "a checkpoint as portable weights, a torch.export program and a model card"),
    "bench loader": ("benchmarks.loader_bench", "loader img/s per backend, resolution and --cores count (no model)"),
    "bench step": ("benchmarks.step_bench", "train step img/s on synthetic data already on the device (no loader)"),
    "bench keepup": ("benchmarks.keepup_bench", "the real loader feeding the real step: does it keep up?"),
    "bench convert": ("benchmarks.convert_bench", "conversion img/s: rn50 convert vs FFCV's DatasetWriter"),
    "bench data": (
        "benchmarks.bench_data",
        "the GPU benchmarks' dataset: generated images, repeated (betons, folders)",
    ),
    "bench proof": ("benchmarks.gpu_proof", "GPU: every loader path vs the compiled step, into a reference file"),
    "bench smoke": ("benchmarks.gpu_smoke", "GPU: every GPU path once, each in its own process, PASS/FAIL/SKIP"),
    "bench sync": ("benchmarks.sync_check", "GPU: the train step under CUDA's sync debug mode (no host waits)"),
    "bench reference": ("benchmarks.reference", "the README's tables from benchmarks/reference/ and benchmarks/cpu/"),
    "doctor": ("benchmarks.doctor", "check this machine and dataset, or an EC2 instance (--instance); recommend"),
}


def usage(prefix: str = "") -> str:
    names = [name for name in COMMANDS if name.startswith(prefix)]
    width = max(len(name) for name in names)
    head = f"usage: rn50 {prefix or 'COMMAND '}{'KIND ' if prefix else ''}[ARGS...]"
    lines = [head, "", "commands:"] + [f"  {name:<{width}}  {COMMANDS[name][1]}" for name in names]
    return "\n".join(lines + ["", "rn50 COMMAND --help shows the flags of a command."])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return int(importlib.import_module(COMMANDS[name][0]).main(argv[words:]) or 0)
    group = f"{argv[0]} "
    if any(name.startswith(group) for name in COMMANDS):  # `rn50 bench` with no kind, a bad one, or --help
        asked = len(argv) == 1 or argv[1] in ("-h", "--help")
        print(
            usage(group) if asked else f"rn50: unknown {argv[0]} kind {argv[1]!r}\n\n{usage(group)}",
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    print(f"rn50: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
