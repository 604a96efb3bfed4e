"""`rn50 bench loader`: images/s of each loader backend, and of a hand-written FFCV Loader doing the same work.

    rn50 bench loader --data-dir BETONS --image-folder ROOT --backend all --res 160 --batch-size 256 --workers 2
    rn50 bench loader --data-dir BETONS --backend ffcv,dali-beton --res 160,224 --cores 1,2 --device cpu --record

Rows (each names its source, beton or folder):
- ffcv: our backend on BETONS/train.beton (keyed crops, planned order, device normalisation).
- ffcv-plain: the baseline, a plain ffcv.loader.Loader with RandomResizedCropRGBImageDecoder + RandomHorizontalFlip +
  ToTensor and FFCV's RANDOM order on the same beton and thread count, then the same device normalisation. Our
  backend should cost nothing over it (>= 0.95x).
- dali-beton: our DALI backend decoding BETONS/train.beton (the GPU's decoder on a GPU, DALI's CPU threads without).
- torchvision, dali-folder: our backends on ROOT/train (the image folders the beton was converted from).

Each pass is timed with benchmarks.timing (to its last batch on the device): a whole epoch, or with `--batches N`
N batches of it after `--warmup` untimed ones (for datasets whose epoch is long at few cores). Passes run in rounds,
one of each backend per round, so other load on a shared machine hits all rows alike. The first pass (FFCV's JIT
compilation, worker start-up, cold page cache) is reported apart and the result is the median of the later passes.
CPU use: the whole machine's busy share over the later passes (other processes included), and the cores this
process kept busy (its CPU seconds per second: FFCV's and DALI's decoding threads run in it; torchvision's worker
processes are not counted there).

`--cores 1,2,4`: each count in a process of its own, confined to that many logical CPUs -- the process, its threads
and its worker processes (os.sched_setaffinity), torch's, numba's and DALI's thread counts and the workers set to the
count (benchmarks.cores) -- so a big machine measures what a smaller one, or an instance's vCPUs per GPU, would give.
Each row records where its threads and workers were allowed to run, checked while the loader ran. `--record` keeps
the rows of a CPU-only run in benchmarks/cpu/<cpu>_<date>.json, `--reference` those of a GPU run in today's
reference file (benchmarks/reference/); `rn50 doctor --instance` and the README's per-instance table read both.
Writes loader.json, loader.md and loader.png to benchmarks/results/ (or --out), each naming the machine, after every
count.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from benchmarks.cores import confine_from_flag, exit_child, parse_counts, pick_cpus, snapshot
from benchmarks.reference import CPU_DIR, REFERENCE_DIR
from benchmarks.report import describe_machine, machine_info, markdown_table, median, out_problem, write_results
from benchmarks.timing import MIN_CPU_WINDOW_S, TOO_SHORT, Measurement, measure

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


def time_pass(epoch_batches: Iterable, device, warmup: int = 0, batches: int | None = None, on_first=None):
    """One pass of a loader (benchmarks.timing.measure): `warmup` batches untimed, then `batches` batches (None: the
    rest of the epoch) timed to the last batch on the device. `on_first()` runs once the first batch is out (the
    loader's threads and workers are running then)."""
    it = iter(epoch_batches)

    def next_batch():
        batch = next(it)
        nonlocal on_first
        if on_first is not None:
            on_first, call = None, on_first
            call()
        return batch

    try:
        return measure(next_batch, device, warmup=warmup, window=batches)
    except StopIteration:
        raise ValueError(
            f"an epoch holds fewer than the --warmup {warmup} + --batches {batches} batches; lower them"
        ) from None
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def summarise(passes: list[Measurement]) -> dict:
    """Rates and CPU figures over the passes after the first. A CPU figure is None ("too short to measure") when no
    pass lasted MIN_CPU_WINDOW_S."""
    rates = [m.images_per_s for m in passes]
    later = passes[1:] or passes

    def cpu(values: list, digits: int) -> float | None:
        values = [v for v in values if v is not None]
        return round(median(values), digits) if values else None

    return {
        "images_per_epoch": passes[0].images,
        "epoch_seconds": [round(m.windows[0]["seconds"], 3) for m in passes],
        "first_epoch_img_s": round(rates[0], 1),
        "img_s": round(median(rates[1:] or rates), 1),
        "cpu_busy_pct": cpu([m.busy_pct for m in later], 1),
        "process_cores": cpu([m.process_cores for m in later], 2),
    }


def cpu_text(r: dict) -> str:
    if r["process_cores"] is None:
        return f"CPU {TOO_SHORT} (epochs under {MIN_CPU_WINDOW_S:.1f} s)"
    busy = "?" if r["cpu_busy_pct"] is None else f"{r['cpu_busy_pct']:.0f}%"
    return f"CPU busy {busy}, this process {r['process_cores']:.1f} cores"


def make_epoch_fn(backend: str, args, resolution: int, device, dtype) -> tuple[Callable[[int], Iterable], object]:
    """(epoch -> that epoch's batches, the loader) for one backend."""
    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    if backend == "ffcv-plain":
        loader = plain_ffcv_loader(
            Path(args.data_dir) / "train.beton", args.batch_size, resolution, args.workers, args.seed
        )
        return (lambda epoch: normalised(loader, device, dtype)), loader
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

    def epoch_batches(epoch: int):
        loader.set_epoch(epoch)
        return loader

    return epoch_batches, loader


def run_resolution(backends: list[str], args, resolution: int, device, dtype, cpus: list[int] | None) -> list[dict]:
    """Passes in rounds (one pass of every backend per round), so load from other processes on a shared machine
    falls on all backends alike instead of on whichever ran while it lasted. Confined (`cpus`): where the process's
    threads and workers may run is recorded once each backend's first batch is out."""
    fns, loaders, passes, where = {}, {}, {}, {}
    for b in backends:
        try:
            fns[b], loaders[b] = make_epoch_fn(b, args, resolution, device, dtype)
            passes[b] = []
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print(f"rn50 bench loader: {b} at {resolution} px failed: {str(e).splitlines()[0]}", file=sys.stderr)
    for epoch in range(args.epochs):
        for b, fn in fns.items():
            probe = None
            if cpus is not None and epoch == 0:
                probe = lambda b=b: where.__setitem__(b, snapshot(cpus))  # noqa: E731
            passes[b].append(time_pass(fn(epoch), device, args.warmup, args.batches, probe))
    rows = []
    for b in fns:
        r = summarise(passes[b])
        r.update(backend=b, source=SOURCE[b], resolution=resolution, workers=args.workers)
        tuning = getattr(loaders[b], "tuning", None)
        if tuning is not None:
            r["dali_threads"] = tuning.threads
        if cpus is not None:
            r.update(cores=len(cpus), cpus=cpus, confinement=where.get(b))
        close = getattr(loaders[b], "close", None)
        if close is not None:
            close()
        rows.append(r)
        print(
            f"{b:>12} {resolution} px: {r['img_s']:8.1f} img/s (first pass {r['first_epoch_img_s']:.1f}), "
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
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="FFCV threads / DataLoader workers / DALI threads (2; with --cores: the count)",
    )
    p.add_argument(
        "--cores",
        default=None,
        metavar="N,N,...",
        help="each count in a process of its own confined to that many logical CPUs (threads, workers, torch, numba "
        "and DALI thread counts to match): rows per backend, resolution and count",
    )
    p.add_argument("--hw-decoder-load", type=float, default=None, help="dali: hardware decoder share (GPU's default)")
    p.add_argument(
        "--dali-threads",
        type=int,
        default=0,
        help="dali: pipeline threads (0: the GPU's default, else --workers; with --cores: the count)",
    )
    p.add_argument("--dali-prefetch", type=int, default=0, help="dali: batches queued ahead (0: the GPU's default)")
    p.add_argument("--epochs", type=int, default=4, help="passes (rounds) per row; the first is reported apart (4)")
    p.add_argument("--warmup", type=int, default=0, help="untimed batches at the start of each pass (0)")
    p.add_argument(
        "--batches",
        type=int,
        default=None,
        help="time this many batches of each epoch after --warmup (default: the whole epoch)",
    )
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default="float16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results/)")
    p.add_argument(
        "--reference",
        nargs="?",
        const=str(REFERENCE_DIR),
        default=None,
        metavar="DIR",
        help="with --cores on a GPU: also record the rows in today's reference file for this GPU "
        "(benchmarks/reference/), beside what scripts/gpu_check.sh measured",
    )
    p.add_argument(
        "--record",
        nargs="?",
        const=str(CPU_DIR),
        default=None,
        metavar="DIR",
        help="with --cores on the CPU (--device cpu): also record the rows in a file named after this CPU "
        "(benchmarks/cpu/), which rn50 doctor --instance and the README read",
    )
    p.add_argument("--copy-to", default=None, help="with --reference/--record: copy the file here after every count")
    p.add_argument("--budget-s", type=float, default=None, help="with --cores: stop starting counts after this long")
    p.add_argument(
        "--started-at", type=float, default=None, help="the budget's clock start, seconds since the epoch (now)"
    )
    p.add_argument("--confined-to", default=None, help=argparse.SUPPRESS)  # a --cores child: its CPUs
    return p


def check_args(args) -> list[str]:
    wanted = backends_of(args)
    problems = [
        f"unknown backend {b!r} (choose from {', '.join(BACKENDS)} or all)" for b in wanted if b not in BACKENDS
    ]
    try:
        resolutions = resolutions_of(args)
    except ValueError:
        resolutions = []
    if not resolutions or min(resolutions) < 8:
        problems.append(f"--res must be integers >= 8, got {args.res!r}")
    if args.epochs < 1 or args.batch_size < 1 or (args.workers is not None and args.workers < 1) or args.warmup < 0:
        problems.append("--epochs, --batch-size and --workers must be >= 1, --warmup >= 0")
    if args.batches is not None and args.batches < 1:
        problems.append("--batches must be >= 1")
    if args.cores:
        try:
            for n in parse_counts(args.cores):
                pick_cpus(n)
        except ValueError as e:
            problems.append(str(e))
    if (args.reference or args.record) and not args.cores:
        problems.append("--reference and --record keep --cores rows: pass --cores")
    return problems


def backends_of(args) -> list[str]:
    return list(BACKENDS) if args.backend == "all" else [b.strip() for b in args.backend.split(",") if b.strip()]


def resolutions_of(args) -> list[int]:
    return [int(r) for r in args.res.split(",") if r.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_problem("rn50 bench loader", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    problems = check_args(args)
    if problems:
        print("rn50 bench loader: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    if args.cores and not args.confined_to:
        return by_cores(args)
    if args.confined_to:
        exit_child(measure_rows(args, confine_from_flag(args.confined_to)))  # confined before torch starts threads
    return measure_rows(args, None)


def measure_rows(args, cpus: list[int] | None) -> int:
    """Every backend and resolution in this process (confined to `cpus`, a --cores child), written to --out."""
    if args.workers is None:
        args.workers = len(cpus) if cpus else 2
    if cpus and not args.dali_threads:
        args.dali_threads = len(cpus)
    import torch

    from pipeline import available_backends

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    installed = set(available_backends())
    plan, skipped = [], []
    for b in backends_of(args):
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
    where = f"{len(cpus)} logical CPUs ({','.join(map(str, cpus))})" if cpus else f"{info['cores']} cores"
    print(
        f"machine: {describe_machine(info)}; device {device}; {where}; {args.workers} workers, batch {args.batch_size}"
    )
    rows = []
    resolutions = resolutions_of(args)
    for resolution in resolutions:
        rows += run_resolution(plan, args, resolution, device, dtype, cpus)
    if not rows:
        return 1

    ratios = {}
    for resolution in resolutions:
        at = {r["backend"]: r["img_s"] for r in rows if r["resolution"] == resolution}
        for a, b in RATIOS:
            if a in at and b in at:
                ratios[f"{a} / {b} @{resolution}"] = round(at[a] / at[b], 3)
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")

    settings = settings_of(args, device, resolutions)
    data = {"machine": info, "settings": settings, "rows": rows, "ratios": ratios, "skipped": skipped}
    md = (
        f"# Loader throughput\n\n{describe_machine(info)}; device {device}, {args.dtype}; {where}; "
        f"{args.workers} workers, batch {args.batch_size}, {args.epochs} passes per row ({pass_text(args)})\n\n"
        + rows_table(rows)
        + "\n\n"
        + "".join(f"- {k}: {v:.2f}x\n" for k, v in ratios.items())
    )
    paths = write_results("loader", data, md, lambda path: chart(path, rows, info, f"{args.workers} workers"), args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


RATIOS = (("ffcv", "ffcv-plain"), ("ffcv", "torchvision"), ("dali-folder", "torchvision"), ("dali-beton", "ffcv"))


def pass_text(args) -> str:
    if args.batches:
        return f"each pass {args.batches} batches after {args.warmup} untimed, inside one epoch"
    return "each pass one whole epoch" + (f" after {args.warmup} untimed batches" if args.warmup else "")


def settings_of(args, device, resolutions: list[int]) -> dict:
    settings = {
        k: getattr(args, k)
        for k in ("data_dir", "image_folder", "batch_size", "workers", "epochs", "warmup", "batches", "seed")
    }
    settings.update(device=str(device), dtype=args.dtype, resolutions=resolutions, passes=pass_text(args))
    return settings


def rows_table(rows: list[dict]) -> str:
    return markdown_table(
        [
            "backend",
            "source",
            "res",
            "img/s (median, passes 2+)",
            "first pass img/s",
            "CPU busy %",
            "process cores",
            "images/pass",
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


def chart(path: Path, rows: list[dict], info: dict, what: str) -> None:
    from benchmarks.report import bar_chart

    bar_chart(
        path,
        [f"{r['backend']} {r['resolution']}" + (f" {r['cores']}c" if "cores" in r else "") for r in rows],
        [r["img_s"] for r in rows],
        f"loader img/s, {describe_machine(info)}, {what}",
        "images / s",
    )


def child_argv(args) -> list[str]:
    """The flags a --cores child gets: this run's, less what only the parent does."""
    argv = ["--backend", args.backend, "--res", args.res, "--batch-size", str(args.batch_size)]
    argv += [
        "--epochs",
        str(args.epochs),
        "--warmup",
        str(args.warmup),
        "--dtype",
        args.dtype,
        "--seed",
        str(args.seed),
    ]
    for flag, value in (
        ("--data-dir", args.data_dir),
        ("--image-folder", args.image_folder),
        ("--workers", args.workers),
        ("--batches", args.batches),
        ("--device", args.device),
        ("--hw-decoder-load", args.hw_decoder_load),
        ("--dali-threads", args.dali_threads or None),
        ("--dali-prefetch", args.dali_prefetch or None),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def by_cores(args) -> int:
    """`--cores`: one confined child per count (benchmarks.cores.run_counts); the rows of each are written as it
    ends: results, and with --reference/--record the kept file and its copy."""
    from benchmarks.cores import run_counts

    counts = parse_counts(args.cores)
    info, rows, state = machine_info(), [], {"settings": None}  # the settings: the first child's, once it ends
    device = args.device or ("cuda" if info["gpu"] else "cpu")
    if args.reference and not device.startswith("cuda"):
        print("rn50 bench loader: error: --reference keeps GPU measurements; on the CPU use --record", file=sys.stderr)
        return 2
    if args.record and device != "cpu":
        print(
            "rn50 bench loader: error: --record keeps CPU-only measurements: add --device cpu, or use --reference "
            "for the GPU's",
            file=sys.stderr,
        )
        return 2

    def write(lost: list[str]) -> None:
        md = cores_markdown(info, rows, state["settings"], lost)
        data = {"machine": info, "settings": state["settings"], "rows": rows, "skipped": lost}
        write_results("loader", data, md, lambda path: chart(path, rows, info, "by logical CPUs"), args.out)
        if args.reference or args.record:
            keep(args, info, rows, state["settings"], lost)

    def on_result(n: int, cpus: list[int], child: dict) -> None:
        workers = "the count" if args.workers is None else args.workers
        state["settings"] = {**child["settings"], "workers": workers, "data": describe_data(args)}
        rows.extend(child["rows"])
        write([])

    started = args.started_at if args.started_at is not None else time.time()
    deadline = None if args.budget_s is None else started + args.budget_s
    lost = run_counts("benchmarks.loader_bench", child_argv(args), counts, "loader.json", on_result, deadline)
    if not rows:
        print("rn50 bench loader: no count was measured", file=sys.stderr)
        return 1
    write(lost)
    print(cores_markdown(info, rows, state["settings"], lost))
    return 1 if lost else 0


def describe_data(args) -> str:
    """What the rows were measured on: the description benchmarks.bench_data wrote beside the data, else the
    beton's own count."""
    import json

    for folder in (args.data_dir, args.image_folder):
        if not folder:
            continue
        for candidate in (Path(folder) / "dataset.json", Path(folder).parent / "dataset.json"):
            if candidate.is_file():
                return json.loads(candidate.read_text()).get("description", str(candidate))
    if args.data_dir and (Path(args.data_dir) / "train.beton").is_file():
        from dataset_tools.beton_format import image_column, read_index

        column = image_column(read_index(Path(args.data_dir) / "train.beton"))
        return f"{len(column.labels):,} samples in {args.data_dir}/train.beton ({column.num_raw:,} stored raw)"
    return str(args.image_folder or args.data_dir)


def cores_markdown(info: dict, rows: list[dict], settings: dict | None, lost: list[str]) -> str:
    """The rows as reference files keep them, one line per backend and resolution, one column per count."""
    from benchmarks.reference import cores_lines

    return (
        f"# Loader throughput by logical CPUs\n\n{describe_machine(info)}\n\n"
        + "\n".join(cores_lines({"settings": settings, "rows": [kept_row(r) for r in rows], "skipped": lost}))
        + "\n"
    )


def keep(args, info: dict, rows: list[dict], settings: dict | None, lost: list[str]) -> None:
    import shutil

    from benchmarks.reference import save
    from benchmarks.report import driver_version

    part = {"settings": settings, "rows": [kept_row(r) for r in rows], "skipped": lost}
    if args.reference:
        path = save(info, Path(args.reference), driver=driver_version(), loader_cores=part)
    else:
        path = save(info, Path(args.record), name=cpu_record_name(info), loader_cores=part)
    if args.copy_to:
        Path(args.copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(args.copy_to) / path.name)


def cpu_record_name(info: dict) -> str:
    from benchmarks.reference import card_slug

    return f"cpu-{card_slug(info['cpu'])}-{info['cores']}cores"


KEPT = (
    "backend",
    "source",
    "resolution",
    "cores",
    "cpus",
    "img_s",
    "first_epoch_img_s",
    "process_cores",
    "cpu_busy_pct",
)


def kept_row(r: dict) -> dict:
    """A --cores row as reference files keep it (benchmarks.reference: LOADER_CORES_ROW_KEYS)."""
    row = {k: r.get(k) for k in KEPT}
    row["res"] = row.pop("resolution")
    row["images_per_s"] = row.pop("img_s")
    row["workers"], row["dali_threads"] = r.get("workers"), r.get("dali_threads")
    c = r.get("confinement") or {}
    row["threads_outside"] = len(c.get("threads_outside", {})) if c else None
    row["processes_outside"] = len(c.get("processes_outside", {})) if c else None
    return row


if __name__ == "__main__":
    sys.exit(main())
