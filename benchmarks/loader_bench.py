"""`rn50 bench loader`: images/s of each loader backend, and of a hand-written FFCV Loader doing the same work.

    rn50 bench loader --data-dir BETONS --image-folder ROOT --backend all --res 160 --batch-size 256 --workers 2

Rows (each names its source, beton or folder):
- ffcv: our backend on BETONS/train.beton (keyed crops, planned order, device normalisation).
- ffcv-plain: the baseline, a plain ffcv.loader.Loader with RandomResizedCropRGBImageDecoder + RandomHorizontalFlip +
  ToTensor and FFCV's RANDOM order on the same beton and thread count, then the same device normalisation. Our
  backend should cost nothing over it (>= 0.95x).
- dali-beton: our DALI backend decoding BETONS/train.beton (the GPU's decoder on a GPU, DALI's CPU threads without).
- torchvision, dali-folder: our backends on ROOT/train (the image folders the beton was converted from).

Every epoch is timed to its last batch (CUDA synchronised); img/s = images / seconds. Epochs run in rounds, one of
each backend per round, so other load on a shared machine hits all rows alike. The first epoch (FFCV's JIT
compilation, worker start-up, cold page cache) is reported apart and the result is the median of the later epochs.
CPU use: the whole machine's busy share over the later epochs (other processes included), and the cores this
process kept busy (its CPU seconds per second: FFCV's and DALI's decoding threads run in it; torchvision's worker
processes are not counted there). Writes loader.json, loader.md and loader.png to
benchmarks/results/ (or --out), each naming the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.report import describe_machine, machine_info, markdown_table, median, out_problem, write_results

BACKENDS = ("ffcv", "ffcv-plain", "dali-beton", "torchvision", "dali-folder")
SOURCE = {
    "ffcv": "beton",
    "ffcv-plain": "beton",
    "dali-beton": "beton",
    "torchvision": "folder",
    "dali-folder": "folder",
}


def plain_ffcv_loader(beton: Path, batch_size: int, resolution: int, workers: int, seed: int):
    """The hand-written baseline: FFCV's own decoder, flip and order, as ffcv-imagenet's train loader (minus
    its cupy normalisation, which is done in torch like our backend's)."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    decoder = RandomResizedCropRGBImageDecoder((resolution, resolution))
    loader = Loader(
        str(beton),
        batch_size=batch_size,
        num_workers=workers,
        order=OrderOption.RANDOM,
        os_cache=True,
        drop_last=True,
        seed=seed,
        pipelines={"image": [decoder, RandomHorizontalFlip(), ToTensor()], "label": [IntDecoder(), ToTensor()]},
    )
    return loader


def normalised(batches: Iterable, device, dtype) -> Iterable:
    from pipeline.contract import device_batches

    return device_batches(
        ((images, labels.view(-1)) for images, labels in batches), device, dtype, source_reuses_buffers=True
    )


MIN_CPU_WINDOW_S = 0.5  # 50 clock ticks: a CPU-time figure over less is mostly rounding
TOO_SHORT = "too short to measure"


def time_epoch(make_epoch: Callable[[], Iterable], device) -> tuple[int, float, float, float]:
    """(images, seconds, machine CPU busy %, cores this process used) of one pass, timed to the last batch (CUDA
    synchronised)."""
    import psutil
    import torch

    me = psutil.Process()
    before, mine = psutil.cpu_times(), me.cpu_times()
    start = time.perf_counter()
    n = 0
    for x, _ in make_epoch():
        n += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    after, mine_after = psutil.cpu_times(), me.cpu_times()
    if seconds < MIN_CPU_WINDOW_S:  # CPU times count clock ticks (10 ms): over a few ticks they say nothing
        return n, seconds, None, None
    cores = (mine_after.user + mine_after.system - mine.user - mine.system) / seconds
    busy = sum(getattr(after, f) - getattr(before, f) for f in ("user", "system", "nice", "irq", "softirq"))
    total = busy + (after.idle - before.idle) + (getattr(after, "iowait", 0) - getattr(before, "iowait", 0))
    return n, seconds, 100.0 * busy / total if total > 0 else None, cores


def summarise(epochs: list[tuple[int, float, float | None, float | None]]) -> dict:
    """Rates and CPU figures over the epochs after the first. A CPU figure is None ("too short to measure") when no
    epoch lasted MIN_CPU_WINDOW_S."""
    rates = [n / s for n, s, _, _ in epochs]
    later = epochs[1:] or epochs

    def cpu(i: int, digits: int) -> float | None:
        values = [e[i] for e in later if e[i] is not None]
        return round(median(values), digits) if values else None

    return {
        "images_per_epoch": epochs[0][0],
        "epoch_seconds": [round(s, 3) for _, s, _, _ in epochs],
        "first_epoch_img_s": round(rates[0], 1),
        "img_s": round(median(rates[1:] or rates), 1),
        "cpu_busy_pct": cpu(2, 1),
        "process_cores": cpu(3, 2),
    }


def cpu_text(r: dict) -> str:
    if r["process_cores"] is None:
        return f"CPU {TOO_SHORT} (epochs under {MIN_CPU_WINDOW_S:.1f} s)"
    busy = "?" if r["cpu_busy_pct"] is None else f"{r['cpu_busy_pct']:.0f}%"
    return f"CPU busy {busy}, this process {r['process_cores']:.1f} cores"


def make_epoch_fn(backend: str, args, resolution: int, device, dtype) -> Callable[[], Iterable]:
    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    if backend == "ffcv-plain":
        loader = plain_ffcv_loader(
            Path(args.data_dir) / "train.beton", args.batch_size, resolution, args.workers, args.seed
        )
        return lambda: normalised(loader, device, dtype)
    data_dir = args.data_dir if SOURCE[backend] == "beton" else args.image_folder
    dali = (
        DALIOptions(
            source=SOURCE[backend],
            hw_decoder_load=args.hw_decoder_load,
            threads=args.dali_threads,
            prefetch=args.dali_prefetch,
        )
        if backend.startswith("dali")
        else DALIOptions()
    )
    loader = build_loader(
        data_dir,
        "train",
        batch_size=args.batch_size,
        resolution=resolution,
        placement=Placement(device, dtype),
        options=LoaderOptions(backend.split("-")[0], args.workers, dali=dali),
        seed=args.seed,
        drop_last=True,
        verbose=False,
    )
    return lambda: loader


def run_resolution(backends: list[str], args, resolution: int, device, dtype) -> list[dict]:
    """Epochs in rounds (one epoch of every backend per round), so load from other processes on a shared machine
    falls on all backends alike instead of on whichever ran while it lasted."""
    fns, epochs = {}, {}
    for b in backends:
        try:
            fns[b] = make_epoch_fn(b, args, resolution, device, dtype)
            epochs[b] = []
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"rn50 bench loader: {b} at {resolution} px failed: {str(e).splitlines()[0]}", file=sys.stderr)
    for _ in range(args.epochs):
        for b, fn in fns.items():
            epochs[b].append(time_epoch(fn, device))
    rows = []
    for b in fns:
        r = summarise(epochs[b])
        r.update(backend=b, source=SOURCE[b], resolution=resolution)
        rows.append(r)
        print(
            f"{b:>12} {resolution} px: {r['img_s']:8.1f} img/s (first epoch {r['first_epoch_img_s']:.1f}), "
            f"{cpu_text(r)}",
            flush=True,
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench loader",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", help="folder with train.beton (ffcv, ffcv-plain, dali-beton)")
    p.add_argument("--image-folder", help="ImageNet-layout root with train/ (torchvision, dali-folder)")
    p.add_argument("--backend", default="all", help=f"one of {', '.join(BACKENDS)}, a comma list, or all")
    p.add_argument("--res", default="160", help="comma-separated resolutions (160)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="FFCV threads / DataLoader workers / DALI threads (2)")
    p.add_argument("--hw-decoder-load", type=float, default=None, help="dali: hardware decoder share (GPU's default)")
    p.add_argument(
        "--dali-threads", type=int, default=0, help="dali: pipeline threads (0: the GPU's default, else --workers)"
    )
    p.add_argument("--dali-prefetch", type=int, default=0, help="dali: batches queued ahead (0: the GPU's default)")
    p.add_argument("--epochs", type=int, default=4, help="epochs (rounds) per row; the first is reported apart (4)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_problem("rn50 bench loader", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    wanted = list(BACKENDS) if args.backend == "all" else [b.strip() for b in args.backend.split(",") if b.strip()]
    problems = [
        f"unknown backend {b!r} (choose from {', '.join(BACKENDS)} or all)" for b in wanted if b not in BACKENDS
    ]
    try:
        resolutions = [int(r) for r in args.res.split(",") if r.strip()]
    except ValueError:
        resolutions = []
    if not resolutions or min(resolutions) < 8:
        problems.append(f"--res must be integers >= 8, got {args.res!r}")
    if args.epochs < 1 or args.batch_size < 1 or args.workers < 1:
        problems.append("--epochs, --batch-size and --workers must be >= 1")
    if problems:
        print("rn50 bench loader: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    import torch

    from pipeline import available_backends

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    installed = set(available_backends())
    plan, skipped = [], []
    for b in wanted:
        needs_beton = SOURCE[b] == "beton"
        source = args.data_dir if needs_beton else args.image_folder
        if "ffcv" in b and "ffcv" not in installed or b.startswith("dali") and "dali" not in installed:
            skipped.append(f"{b}: package not installed")
        elif not source:
            skipped.append(f"{b}: needs {'--data-dir with train.beton' if needs_beton else '--image-folder'}")
        elif needs_beton and not (Path(source) / "train.beton").is_file():
            skipped.append(f"{b}: {Path(source) / 'train.beton'} missing (rn50 convert writes it)")
        elif not needs_beton and not (Path(source) / "train").is_dir():
            skipped.append(f"{b}: {Path(source) / 'train'} missing")
        else:
            plan.append(b)
    for s in skipped:
        print(f"skip {s}", file=sys.stderr)
    if not plan:
        print("rn50 bench loader: error: nothing to run", file=sys.stderr)
        return 2

    info = machine_info()
    print(f"machine: {describe_machine(info)}; device {device}; {args.workers} workers, batch {args.batch_size}")
    rows = []
    for resolution in resolutions:
        rows += run_resolution(plan, args, resolution, device, dtype)
    if not rows:
        return 1

    ratios = {}
    for resolution in resolutions:
        at = {r["backend"]: r["img_s"] for r in rows if r["resolution"] == resolution}
        if "ffcv" in at and "ffcv-plain" in at:
            ratios[f"ffcv / ffcv-plain @{resolution}"] = round(at["ffcv"] / at["ffcv-plain"], 3)
        if "ffcv" in at and "torchvision" in at:
            ratios[f"ffcv / torchvision @{resolution}"] = round(at["ffcv"] / at["torchvision"], 3)
        if "dali-folder" in at and "torchvision" in at:
            ratios[f"dali-folder / torchvision @{resolution}"] = round(at["dali-folder"] / at["torchvision"], 3)
        if "dali-beton" in at and "ffcv" in at:
            ratios[f"dali-beton / ffcv @{resolution}"] = round(at["dali-beton"] / at["ffcv"], 3)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")

    settings = {k: getattr(args, k) for k in ("data_dir", "image_folder", "batch_size", "workers", "epochs", "seed")}
    settings.update(device=str(device), dtype=args.dtype, resolutions=resolutions)
    data = {"machine": info, "settings": settings, "rows": rows, "ratios": ratios, "skipped": skipped}
    table = markdown_table(
        [
            "backend",
            "source",
            "res",
            "img/s (median, epochs 2+)",
            "first epoch img/s",
            "CPU busy %",
            "process cores",
            "images/epoch",
        ],
        [
            [
                r["backend"],
                r["source"],
                r["resolution"],
                r["img_s"],
                r["first_epoch_img_s"],
                TOO_SHORT if r["cpu_busy_pct"] is None else r["cpu_busy_pct"],
                TOO_SHORT if r["process_cores"] is None else r["process_cores"],
                r["images_per_epoch"],
            ]
            for r in rows
        ],
    )
    md = (
        f"# Loader throughput\n\n{describe_machine(info)}; device {device}, {args.dtype}; {args.workers} workers, "
        f"batch {args.batch_size}, {args.epochs} epochs per row\n\n{table}\n\n"
        + "".join(f"- {k}: {v:.2f}x\n" for k, v in ratios.items())
    )

    def chart(path: Path) -> None:
        from benchmarks.report import bar_chart

        bar_chart(
            path,
            [f"{r['backend']} {r['resolution']}" for r in rows],
            [r["img_s"] for r in rows],
            f"loader img/s, {describe_machine(info)}, {args.workers} workers",
            "images / s",
        )

    paths = write_results("loader", data, md, chart, args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
