"""`rn50 bench step`: how fast the GPU trains when data costs nothing -- the ceiling every loader is measured against.

    rn50 bench step --res 160,192,224 --precision bf16 --batch-size 256
    rn50 bench step --res 160 --compile                       # torch.compile (compile time reported apart)
    rn50 bench step --res 224 --precision fp16 --no-channels-last

Runs the trainer's own `training.engine.train_step` (autocast, GradScaler, SGD with weight-decay groups) on synthetic
tensors already on the device, so the only cost is the model. After `--warmup` steps (which hold cuDNN autotuning
and, with --compile, compilation), it times `--windows` windows of `--steps` steps with CUDA events and reports the
median window's img/s. On a CPU the same code runs with wall-clock timing (useful for checking, not for numbers).
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.report import bar_chart, describe_machine, machine_info, markdown_table, median, write_results


def parse_list(text: str, cast=int) -> list:
    return [cast(x) for x in str(text).split(",") if x.strip()]


def make_parts(arch: str, num_classes: int, precision_name: str, device, compile_model: bool, channels_last: bool,
               lr: float = 0.1):
    """The pieces `train_step` needs, built by the trainer's own builder (training.components.make_parts) with a
    constant LR: the schedule's cost is one Python call per step either way."""
    from training.components import make_parts as build
    from training.config import TrainConfig
    from training.distributed import DistContext
    from training.engine import resolve_precision
    from training.schedules import Schedule

    precision = resolve_precision(precision_name, device)
    cfg = TrainConfig(arch=arch, step="compile" if compile_model else "eager", channels_last=channels_last,
                      weight_decay=5e-5, momentum=0.9, label_smoothing=0.1)
    schedule = Schedule(kind="step", max_lr=lr, steps_per_epoch=1, epochs=1)
    parts, _, _ = build(cfg, num_classes, DistContext(0, 0, 1, device), precision, schedule)
    return parts, precision


class Timer:
    """CUDA events on a GPU (measures the device's work, no host sync inside the window), perf_counter otherwise."""

    def __init__(self, device):
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        self.device = device

    def start(self):
        if self.cuda:
            self._start = self.torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._start.elapsed_time(end) / 1e3
        return time.perf_counter() - self._t0


def resolve_device(device: str):
    from training.distributed import resolve_device as resolve

    return resolve(device, local_rank=0)


def run_windows(parts, device, next_batch, warmup: int, steps: int, windows: int) -> dict:
    """Warm up, then time `windows` windows of `steps` train steps on batches from `next_batch()`.

    Timing covers the device's timeline from the first step's launch to the last one's end (CUDA events), so a GPU
    left idle while the host waits for data is counted. The host time spent inside `next_batch()` is reported as
    the data-wait share (an upper bound on GPU idle time: queued work keeps the GPU busy meanwhile)."""
    from training.engine import train_step

    timer = Timer(device)
    timer.start()
    for i in range(max(1, warmup)):
        images, labels = next_batch()
        train_step(parts, [(images, labels)], i, device)
    warmup_s = timer.stop()
    rates, waits = [], []
    for w in range(windows):
        wait, samples = 0.0, 0
        timer.start()
        for i in range(steps):
            t0 = time.perf_counter()
            images, labels = next_batch()
            wait += time.perf_counter() - t0
            samples += images.shape[0]
            train_step(parts, [(images, labels)], warmup + w * steps + i, device)
        elapsed = timer.stop()
        rates.append(samples / elapsed)
        waits.append(min(1.0, wait / elapsed))
    return {"warmup_s": warmup_s, "steps_per_window": steps, "windows_images_per_s": rates,
            "images_per_s": median(rates), "data_wait_share": median(waits)}


def synthetic_batches(batch_size: int, res: int, num_classes: int, dtype, device, channels_last: bool = True):
    """`next_batch` for the step alone: one fixed batch already on the device."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch_size, 3, res, res, generator=gen).to(device, dtype=dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    return lambda: (images, labels)


def measure_step(arch: str = "resnet50", res: int = 160, batch_size: int = 256, precision: str = "auto",
                 compile_model: bool = False, channels_last: bool = True, device: str = "auto", warmup: int = 10,
                 steps: int = 20, windows: int = 5, num_classes: int = 1000) -> dict:
    """Median img/s of the train step on synthetic data, plus warm-up (compile) time and peak memory."""
    import torch

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    parts, prec = make_parts(arch, num_classes, precision, dev, compile_model, channels_last)
    timing = run_windows(parts, dev, synthetic_batches(batch_size, res, num_classes, prec.input_dtype, dev,
                                                        channels_last), warmup, steps, windows)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"arch": arch, "res": res, "batch_size": batch_size, "precision": prec.name, "compile": compile_model,
            "channels_last": channels_last, "device": str(dev), "warmup_steps": warmup, **timing,
            "peak_memory_gib": peak}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rn50 bench step", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--res", default="160,192,224", help="comma-separated resolutions (160,192,224)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time reported apart)")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW instead of channels_last")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cuda:1, cpu")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (10)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (20)")
    p.add_argument("--windows", type=int, default=5, help="timed windows; the median is reported (5)")
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        resolutions = parse_list(args.res)
    except ValueError:
        print(f"rn50 bench step: error: --res wants integers like 160,192,224, got {args.res!r}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.steps < 1 or args.windows < 1 or not resolutions:
        print("rn50 bench step: error: --batch-size, --steps, --windows must be >= 1 and --res non-empty",
              file=sys.stderr)
        return 2
    info = machine_info()
    results = []
    for res in resolutions:
        r = measure_step(args.arch, res, args.batch_size, args.precision, args.compile, not args.no_channels_last,
                         args.device, args.warmup, args.steps, args.windows)
        results.append(r)
        print(f"  {args.arch} {res}px bs{args.batch_size} {r['precision']}{' compiled' if args.compile else ''}: "
              f"{r['images_per_s']:,.0f} img/s (warm-up {r['warmup_s']:.1f} s)", file=sys.stderr)
    layout = "NCHW" if args.no_channels_last else "channels_last"
    mode = "torch.compile" if args.compile else "eager"
    rows = [[r["res"], r["images_per_s"], ", ".join(f"{x:,.0f}" for x in r["windows_images_per_s"]),
             r["warmup_s"], f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"] for r in results]
    md = (f"# rn50 bench step\n\n{describe_machine(info)}; {args.arch}, batch {args.batch_size}, "
          f"{results[0]['precision']}, {layout}, {mode}, device {results[0]['device']}\n\n"
          + markdown_table(["res", "median img/s", "img/s per window", "warm-up s", "peak GiB"], rows) + "\n")
    data = {"machine": info, "args": vars(args), "results": results}
    paths = write_results("step", data, md, lambda p: bar_chart(
        p, [f"{r['res']}px" for r in results], [r["images_per_s"] for r in results],
        f"train step only ({mode}, {results[0]['precision']}), {describe_machine(info)}", "images/s (median)"),
        args.out)
    print(md)
    print("results: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
