"""`rn50 bench step`: how fast the GPU trains when data costs nothing -- the ceiling every loader is measured against,
and what each lever of the step is worth.

    rn50 bench step --res 160,192,224 --precision bf16 --batch-size 256            # eager and compiled rows
    rn50 bench step --res 224 --levers all                                         # every lever, one row each
    rn50 bench step --res 224 --levers compile,graphs,fused,bs512 --precision bf16

Runs the trainer's own step (`training.engine.train_step`: autocast, GradScaler, SGD with weight-decay groups; the
CUDA-graph step of training.graphs) on synthetic tensors already on the device, so the only cost is the model. After
`--warmup` steps (which hold cuDNN autotuning, compilation and graph capture: reported as compile_s), it times
`--windows` windows of `--steps` steps with CUDA events and reports the median window's img/s. On a CPU the same code
runs with wall-clock timing (useful for checking, not for numbers).

Levers, each one change against the baseline `compile` (torch.compile default mode, foreach SGD, batch 256 or
--batch-size, normalised input in the training dtype, 3 channels):
    eager            no compilation
    compile          the baseline
    reduce-overhead  torch.compile mode="reduce-overhead" (inductor's own CUDA graphs of forward and backward)
    max-autotune     torch.compile mode="max-autotune" (slow to compile)
    graphs           the whole step (forward, backward, SGD update, EMA-free) as one CUDA graph (--step graphs)
    fused            SGD(fused=True)
    normalize-inside uint8 NHWC input; normalisation and the dtype cast inside the compiled region
    pad4             the input padded to 4 channels (and conv1 with a zero 4th input channel)
    bs384, bs512     batch 384 / 512 per GPU
    best             graphs + fused (+ --best-batch, default 256)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.report import (
    bar_chart,
    describe_machine,
    machine_info,
    markdown_table,
    out_problem,
    report_failure,
    write_results,
)
from benchmarks.timing import Measurement, measure, train_step_fn


def parse_list(text: str, cast=int) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def make_parts(
    arch: str,
    num_classes: int,
    precision_name: str,
    device,
    compile_model: bool,
    channels_last: bool,
    lr: float = 0.1,
    lever: Lever | None = None,
):
    """The pieces `train_step` needs, built by the trainer's own builder (training.components.make_parts) with a
    constant LR (the schedule's cost is one Python call per step either way), changed as `lever` says."""
    from training.components import make_parts as build
    from training.config import TrainConfig
    from training.distributed import DistContext
    from training.engine import resolve_precision
    from training.schedules import Schedule

    lever = lever or Lever("compile" if compile_model else "eager", mode="compile" if compile_model else "eager")
    precision = resolve_precision(precision_name, device)
    step = {"eager": "eager", "graphs": "graphs"}.get(lever.mode, "compile")
    cfg = TrainConfig(
        arch=arch,
        step=step,
        sgd=lever.sgd,
        channels_last=channels_last,
        weight_decay=5e-5,
        momentum=0.9,
        label_smoothing=0.1,
    )
    schedule = Schedule(kind="step", max_lr=lr, steps_per_epoch=1, epochs=1)
    compile_mode = lever.mode if lever.mode in ("reduce-overhead", "max-autotune") else None
    parts, _, _ = build(
        cfg,
        num_classes,
        DistContext(0, 0, 1, device),
        precision,
        schedule,
        model_hook=lever.model_hook(precision.input_dtype),
        compile_mode=compile_mode,
    )
    return parts, precision


@dataclass(frozen=True)
class Lever:
    """One change against the baseline compiled step (see the module docstring)."""

    name: str
    mode: str = "compile"  # eager | compile | reduce-overhead | max-autotune | graphs
    sgd: str = "foreach"
    batch_size: int | None = None  # None: --batch-size
    normalize_inside: bool = False
    channels: int = 3

    def model_hook(self, dtype):
        if self.normalize_inside:
            return lambda model: NormalizedInput(model, dtype)
        if self.channels == 4:
            return pad_stem_to_4_channels
        return None

    @property
    def compiled(self) -> bool:
        return self.mode != "eager"


LEVERS = (
    "eager",
    "compile",
    "reduce-overhead",
    "max-autotune",
    "graphs",
    "fused",
    "normalize-inside",
    "pad4",
    "bs384",
    "bs512",
    "best",
)


def lever(name: str, best_batch: int | None = None) -> Lever:
    table = {
        "eager": Lever("eager", mode="eager"),
        "compile": Lever("compile"),
        "reduce-overhead": Lever("reduce-overhead", mode="reduce-overhead"),
        "max-autotune": Lever("max-autotune", mode="max-autotune"),
        "graphs": Lever("graphs", mode="graphs"),
        "fused": Lever("fused", sgd="fused"),
        "normalize-inside": Lever("normalize-inside", normalize_inside=True),
        "pad4": Lever("pad4", channels=4),
        "bs384": Lever("bs384", batch_size=384),
        "bs512": Lever("bs512", batch_size=512),
        "best": Lever("best", mode="graphs", sgd="fused", batch_size=best_batch),
    }
    if name not in table:
        raise ValueError(f"unknown lever {name!r}; choose from {', '.join(LEVERS)}")
    return table[name]


class NormalizedInput(nn.Module):
    """uint8 NHWC batches in, the model's normalised channels_last input made inside (so torch.compile fuses the
    normalisation and the dtype cast into its first kernels instead of the loader writing a float batch)."""

    def __init__(self, model: nn.Module, dtype) -> None:
        super().__init__()
        from pipeline.contract import IMAGENET_MEAN, IMAGENET_STD

        self.model, self.dtype = model, dtype
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        x = (x.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std
        return self.model(x.to(self.dtype))


def pad_stem_to_4_channels(model: nn.Module) -> nn.Module:
    """conv1 takes 4 input channels, the 4th with zero weights: the same function, on NHWC input whose pixels are
    8 bytes wide in bf16 (aligned loads in the first convolution; MLPerf's ResNet-50 pads its input this way)."""
    old = model.conv1
    new = nn.Conv2d(4, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :3] = old.weight
    model.conv1 = new.to(memory_format=torch.channels_last)
    return model


def resolve_device(device: str):
    from training.distributed import resolve_device as resolve

    return resolve(device, local_rank=0)


def step_alone(parts, device, next_batch, warmup: int, steps: int, windows: int) -> Measurement:
    """The train step alone: `warmup` untimed steps (compilation, capture, cuDNN autotuning), then `windows` windows
    of `steps` steps on batches from `next_batch()` (benchmarks.timing.measure)."""
    return measure(next_batch, device, step=train_step_fn(parts, device), warmup=warmup, window=steps, windows=windows)


def synthetic_batches(
    batch_size: int, res: int, num_classes: int, dtype, device, channels_last: bool = True, lever: Lever | None = None
):
    """`next_batch` for the step alone: one fixed batch already on the device, in the form the lever's model takes
    (normalised `dtype` NCHW/channels_last; uint8 NHWC for normalize-inside; 4 channels for pad4)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    if lever is not None and lever.normalize_inside:
        images = torch.randint(0, 256, (batch_size, res, res, 3), generator=gen, dtype=torch.uint8).to(device)
    else:
        channels = lever.channels if lever is not None else 3
        images = torch.randn(batch_size, channels, res, res, generator=gen).to(device, dtype=dtype)
        if lever is not None and channels == 4:
            images[:, 3] = 0
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    return lambda: (images, labels)


def measure_step(
    arch: str = "resnet50",
    res: int = 160,
    batch_size: int = 256,
    precision: str = "auto",
    compile_model: bool = False,
    channels_last: bool = True,
    device: str = "auto",
    warmup: int = 10,
    steps: int = 20,
    windows: int = 5,
    num_classes: int = 1000,
    lever: Lever | None = None,
) -> dict:
    """Median img/s of the train step on synthetic data, plus warm-up (compile, capture) time and peak memory."""
    dev = resolve_device(device)
    lever = lever or Lever("compile" if compile_model else "eager", mode="compile" if compile_model else "eager")
    batch = lever.batch_size or batch_size
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    torch._dynamo.reset()  # every lever compiles afresh: its compile time is its own
    parts, prec = make_parts(arch, num_classes, precision, dev, compile_model, channels_last, lever=lever)
    m = step_alone(
        parts,
        dev,
        synthetic_batches(batch, res, num_classes, prec.input_dtype, dev, channels_last, lever),
        max(1, warmup),
        steps,
        windows,
    )
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    wanted = {"eager": "eager", "graphs": "graphs"}.get(lever.mode, "compile")
    mode = lever.mode if parts.step_mode == wanted else f"{parts.step_mode} ({parts.step_why})"
    return {
        "lever": lever.name,
        "mode": mode,
        "sgd": lever.sgd,
        "input": "uint8 NHWC" if lever.normalize_inside else f"{lever.channels} channels",
        "arch": arch,
        "res": res,
        "batch_size": batch,
        "precision": prec.name,
        "compile": lever.compiled,
        "channels_last": channels_last,
        "device": str(dev),
        "warmup_steps": warmup,
        "warmup_s": m.warmup_s,
        "steps_per_window": steps,
        "windows_images_per_s": m.windows_images_per_s,
        "images_per_s": m.images_per_s,
        "compile_s": m.warmup_s,
        "peak_memory_gib": peak,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench step",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--res", default="160,192,224", help="comma-separated resolutions (160,192,224)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument(
        "--levers",
        default=None,
        help=f"comma-separated, of {', '.join(LEVERS)}, or all (default: eager; --compile: compile)",
    )
    p.add_argument("--compile", action="store_true", help="= --levers compile")
    p.add_argument("--best-batch", type=int, default=None, help="batch size of the 'best' lever (--batch-size)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:1, cpu")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (20)")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (5)")
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    p.add_argument(
        "--reference",
        nargs="?",
        const="benchmarks/reference",
        default=None,
        metavar="DIR",
        help="also record the rows in today's reference file for this GPU (benchmarks/reference/; "
        "GPU only), beside what scripts/gpu_check.sh measured",
    )
    p.add_argument("--copy-to", default=None, help="with --reference: copy the reference file here after every row")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_problem("rn50 bench step", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    try:
        resolutions = parse_list(args.res)
        names = (
            list(LEVERS)
            if args.levers == "all"
            else parse_list(args.levers or ("compile" if args.compile else "eager"), str)
        )
        levers = [lever(name, args.best_batch) for name in names]
    except ValueError as e:
        what = str(e) if "lever" in str(e) else f"--res wants integers like 160,192,224, got {args.res!r}"
        print(f"rn50 bench step: error: {what}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.steps < 1 or args.windows < 1 or not resolutions or not levers:
        print(
            "rn50 bench step: error: --batch-size, --steps, --windows must be >= 1 and --res, --levers non-empty",
            file=sys.stderr,
        )
        return 2
    info = machine_info()
    if args.reference and not info["gpu"]:
        print("rn50 bench step: --reference records GPU measurements; nothing measured", file=sys.stderr)
        return 2
    results, failures, compiled_before = [], [], False
    for lv in levers:
        for res in resolutions:
            try:
                r = measure_step(
                    args.arch,
                    res,
                    args.batch_size,
                    args.precision,
                    False,
                    not args.no_channels_last,
                    args.device,
                    args.warmup,
                    args.steps,
                    args.windows,
                    lever=lv,
                )
            except Exception as e:  # one lever failing (a capture, a compilation) keeps every other row
                failures.append(report_failure("rn50 bench step", f"lever {lv.name} at {res} px", e))
                compiled_before |= lv.compiled
                continue
            if r["mode"].startswith("graphs") and lv.sgd == "fused":
                r["sgd"] = "graph's own SGD (fused not in effect)"
            if lv.compiled and compiled_before:  # an earlier lever compiled (or tried to) in this process
                r["compile_note"] = "inductor's cache warm from an earlier lever in this process"
            compiled_before |= lv.compiled
            results.append(r)
            print(
                f"  {lv.name:16s} {args.arch} {res}px bs{r['batch_size']} {r['precision']} {r['mode']}: "
                f"{r['images_per_s']:,.0f} img/s (compile/warm-up {r['compile_s']:.1f} s"
                f"{'; cache warm' if r.get('compile_note') else ''})",
                file=sys.stderr,
            )
            write_all(args, info, results, failures)
    if failures:
        print("rn50 bench step: failed: " + "; ".join(failures), file=sys.stderr)
    if not results:
        print("rn50 bench step: no lever was measured", file=sys.stderr)
        return 1
    print(write_all(args, info, results, failures))
    return 1 if failures else 0


def write_all(args, info: dict, results: list[dict], failures: list[str]) -> str:
    """Write the results so far (JSON, Markdown, chart; the reference file and its copy with --reference): called
    after every row, so a lever that fails or hangs later loses nothing measured before it. Returns the Markdown."""
    baseline = {r["res"]: r["images_per_s"] for r in results if r["lever"] == "compile"}
    for r in results:
        r["vs_compile"] = r["images_per_s"] / baseline[r["res"]] if r["res"] in baseline else None
    layout = "NCHW" if args.no_channels_last else "channels_last"
    rows = [
        [
            r["lever"],
            r["res"],
            r["batch_size"],
            r["mode"],
            r["sgd"],
            r["input"],
            r["images_per_s"],
            f"{r['vs_compile']:.2f}" if r["vs_compile"] else "-",
            f"{r['compile_s']:.1f}{' (cache warm)' if r.get('compile_note') else ''}",
            f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-",
        ]
        for r in results
    ]
    md = (
        f"# rn50 bench step\n\n{describe_machine(info)}; {args.arch}, {results[0]['precision']}, {layout}, device "
        f"{results[0]['device']}; median of {args.windows} windows of {args.steps} steps\n\n"
        + markdown_table(
            ["lever", "res", "batch", "mode", "SGD", "input", "median img/s", "vs compile", "compile s", "peak GiB"],
            rows,
        )
        + "\n"
        + "".join(f"\nfailed: {f}" for f in failures)
    )
    data = {"machine": info, "args": vars(args), "results": results, "failed": failures}
    paths = write_results(
        "step",
        data,
        md,
        lambda p: bar_chart(
            p,
            [f"{r['lever']} {r['res']}px" for r in results],
            [r["images_per_s"] for r in results],
            f"train step only ({results[0]['precision']}), {describe_machine(info)}",
            "images/s (median)",
        ),
        args.out,
    )
    md += "\nresults: " + ", ".join(str(p) for p in paths.values())
    if args.reference:
        import shutil

        from benchmarks.reference import save
        from benchmarks.report import driver_version

        keys = (
            "lever",
            "res",
            "batch_size",
            "precision",
            "mode",
            "sgd",
            "input",
            "images_per_s",
            "vs_compile",
            "compile_s",
            "compile_note",
            "peak_memory_gib",
            "windows_images_per_s",
        )
        path = save(
            info,
            Path(args.reference),
            driver=driver_version(),
            step=[{k: r[k] for k in keys if k in r} for r in results],
            step_failed=failures,
        )
        md += f"\nreference: {path}"
        if args.copy_to:
            Path(args.copy_to).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(args.copy_to) / path.name)
    return md


if __name__ == "__main__":
    sys.exit(main())
