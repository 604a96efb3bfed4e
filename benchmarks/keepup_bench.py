"""`rn50 bench keepup`: does the loader keep up with the GPU? The real loader feeding the real train step.

    rn50 bench keepup --data-dir /data/betons --backend ffcv --res 160
    rn50 bench keepup --data-dir /data/betons --image-folder /data/imagenet --backend ffcv,dali-beton,dali-folder \
        --res 160,192 --compile

For each backend and resolution it measures, with the one keep-up method of benchmarks.timing (the same as
`rn50 bench proof`): (1) the train step alone on a synthetic batch already on the device (`rn50 bench step`), after a
warm-up that holds compilation and cuDNN autotuning; (2) the loader alone and (3) the same step fed by the loader, each
in an epoch of its own: `--warmup` batches of it untimed (FFCV's JIT compilation, the pipeline's first batches), then
`--windows` windows of `--steps` batches, so an epoch must hold warmup + windows x steps batches and epoch starts never
fall into a window. The ratio end-to-end / step-alone is the verdict: >= 0.95 "keeps up". The data-wait share is the
host time spent waiting in `next(loader)`; because the GPU runs queued work meanwhile, it is an upper bound on the
GPU's idle time -- the ratio is the number to trust. When the loader falls behind, the report names the first thing
to change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.cores import confine_from_flag, exit_child, parse_counts, pick_cpus, snapshot
from benchmarks.report import describe_machine, machine_info, markdown_table, out_problem, usable_cores, write_results
from benchmarks.step_bench import make_parts, parse_list, resolve_device, step_alone, synthetic_batches
from benchmarks.timing import KEEPS_UP, keep_up


def advice(backend: str, ratio: float, wait_share: float, workers: int, cores: int) -> str:
    """The first thing to change, in the order that usually pays most."""
    if ratio >= KEEPS_UP:
        return "nothing: the loader keeps up"
    if backend == "torchvision":
        return (
            "PIL decoding on the CPU is the bottleneck: convert once to .beton (rn50 convert) and use "
            "--loader ffcv, or use --loader dali on a GPU machine"
        )
    if workers < cores:
        return f"raise --workers from {workers} to {cores} (this machine's cores)"
    if backend == "ffcv":
        return (
            "decoding is CPU-bound at this core count: re-convert with --compress-prob 0.25 (more images stored "
            "raw: faster to load, larger file) or a smaller --max-res, train at a lower --res early on "
            "(progressive resizing), or use --loader dali to decode on the GPU"
        )
    if backend == "dali":
        return (
            "raise hw_decoder_load towards 0.9 on A100/H100 (hardware JPEG decoder) or give DALI more threads; "
            "on GPUs without the hardware decoder, nvJPEG's CUDA decode competes with training"
        )
    return "profile the loader: rn50 bench loader"


def measure_keepup(
    data_dir: Path,
    backend: str,
    res: int,
    batch_size: int,
    workers: int,
    precision: str,
    compile_model: bool,
    device: str,
    arch: str,
    warmup: int,
    steps: int,
    windows: int,
    dali_source: str = "auto",
) -> dict:
    """The keep-up method (benchmarks.timing.keep_up): the model (compiled once) on a synthetic batch already on the
    device, then the loader alone and the loader feeding the same step, each inside an epoch of its own after
    `warmup` batches of it."""
    import torch

    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader
    from training.engine import resolve_precision

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loader = build_loader(
        data_dir,
        "train",
        batch_size=batch_size,
        resolution=res,
        placement=Placement(dev, resolve_precision(precision, dev).input_dtype),
        options=LoaderOptions(backend, workers, dali=DALIOptions(source=dali_source)),
        seed=0,
        drop_last=True,
        verbose=False,
    )
    try:
        parts, prec = make_parts(arch, loader.num_classes, precision, dev, compile_model, True)
        batch = synthetic_batches(batch_size, res, loader.num_classes, prec.input_dtype, dev)
        alone = step_alone(parts, dev, batch, max(1, warmup), steps, windows)
        k = keep_up(loader, parts, alone, dev, epoch=0, warmup=warmup, window=steps, windows=windows)
    finally:
        loader.close()
    fed = k["fed"]
    source = loader.source_kind if loader.backend == "dali" else "beton" if loader.backend == "ffcv" else "folder"
    return {
        "backend": loader.backend,
        "source": source,
        "res": res,
        "batch_size": batch_size,
        "workers": workers,
        "precision": prec.name,
        "compile": compile_model,
        "compiled": compile_model,
        "device": str(dev),
        "step_alone_images_per_s": alone.images_per_s,
        "loader_alone_images_per_s": k["loader_alone"].images_per_s,
        "end_to_end_images_per_s": fed.images_per_s,
        "windows_images_per_s": fed.windows_images_per_s,
        "data_wait_share": fed.data_wait_share,
        "process_cores": fed.process_cores,
        "ratio": k["ratio"],
        "verdict": k["verdict"],
        "warmup_s": {"step_alone": alone.warmup_s, "loader_fed": fed.warmup_s},
        "advice": advice(loader.backend, k["ratio"], fed.data_wait_share, workers, usable_cores()),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench keepup",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data-dir", required=True, help="folder with train.beton (ffcv) or train/<wnid>/ (dali, torchvision)"
    )
    p.add_argument("--image-folder", help="ImageNet-layout root for dali/torchvision when --data-dir holds betons")
    p.add_argument(
        "--backend",
        default="auto",
        help="ffcv, dali-beton, dali-folder, dali (beton if there is one), "
        "torchvision, auto, all, or a comma-separated list",
    )
    p.add_argument("--res", default="160", help="comma-separated resolutions (160)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="loader workers (all cores; with --cores: the count)")
    p.add_argument(
        "--cores",
        default=None,
        metavar="N,N,...",
        help="each count in a process of its own confined to that many logical CPUs (the loader's threads and "
        "workers, the training step's and the libraries' thread counts to match): rows per count",
    )
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (20)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window (30)")
    p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported (3)")
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    p.add_argument("--confined-to", default=None, help=argparse.SUPPRESS)  # a --cores child: its CPUs
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_problem("rn50 bench keepup", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    backends = (
        ["ffcv", "dali-beton", "dali-folder", "torchvision"] if args.backend == "all" else parse_list(args.backend, str)
    )
    try:
        resolutions = parse_list(args.res)
    except ValueError:
        print(f"rn50 bench keepup: error: --res wants integers like 160,192, got {args.res!r}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        print(f"rn50 bench keepup: error: {data_dir}: no such folder", file=sys.stderr)
        return 2
    if args.cores and not args.confined_to:
        try:
            counts = parse_counts(args.cores)
            for n in counts:
                pick_cpus(n)
        except ValueError as e:
            print(f"rn50 bench keepup: error: {e}", file=sys.stderr)
            return 2
        return by_cores(args, counts)
    if args.confined_to:
        exit_child(measure_all(args, backends, resolutions, confine_from_flag(args.confined_to)))
    return measure_all(args, backends, resolutions, None)


def measure_all(args, backends: list[str], resolutions: list[int], cpus: list[int] | None) -> int:
    """Every backend and resolution in this process (confined to `cpus`, a --cores child), written to --out."""
    data_dir = Path(args.data_dir)
    if args.workers is None:
        args.workers = usable_cores()
    info = machine_info()
    results = []
    for backend in backends:
        folder = backend in ("dali-folder", "torchvision") or (
            backend == "dali" and not (data_dir / "train.beton").is_file()
        )
        source = Path(args.image_folder) if args.image_folder and folder else data_dir
        name, dali_source = ("dali", backend.split("-")[1]) if backend.startswith("dali-") else (backend, "auto")
        for res in resolutions:
            try:
                r = measure_keepup(
                    source,
                    name,
                    res,
                    args.batch_size,
                    args.workers,
                    args.precision,
                    args.compile,
                    args.device,
                    args.arch,
                    args.warmup,
                    args.steps,
                    args.windows,
                    dali_source,
                )
            except (FileNotFoundError, RuntimeError, ValueError, ImportError) as e:
                print(f"  {backend} {res}px: skipped ({e})", file=sys.stderr)
                continue
            if cpus:
                r.update(cores=len(cpus), cpus=cpus, confinement=snapshot(cpus))
            results.append(r)
            print(
                f"  {r['backend']} ({r['source']}) {res}px: {r['end_to_end_images_per_s']:,.0f} img/s end to end, "
                f"step alone "
                f"{r['step_alone_images_per_s']:,.0f} -> {r['ratio']:.2f} ({r['verdict']})",
                file=sys.stderr,
            )
    if not results:
        print("rn50 bench keepup: error: no backend could run on this data (see the lines above)", file=sys.stderr)
        return 1
    print(write_keepup(args, info, results))
    return 0


def write_keepup(args, info: dict, results: list[dict]) -> str:
    """keepup.json, keepup.md and keepup.png; returns the Markdown and where they went."""
    by_cores = any("cores" in r for r in results)
    rows = [
        [
            r["backend"],
            r["source"],
            r["res"],
            *([r.get("cores", "-")] if by_cores else []),
            r["end_to_end_images_per_s"],
            r["step_alone_images_per_s"],
            f"{r['ratio']:.2f}",
            f"{100 * r['data_wait_share']:.0f}%",
            r["verdict"],
        ]
        for r in results
    ]
    workers = "workers = the count" if by_cores and args.workers is None else f"{args.workers} workers"
    md = (
        f"# rn50 bench keepup\n\n{describe_machine(info)}; {args.arch}, batch {args.batch_size}, "
        f"{results[0]['precision']}, {'torch.compile' if args.compile else 'eager'}, {workers}, "
        f"device {results[0]['device']}\n\n"
        + markdown_table(
            [
                "backend",
                "source",
                "res",
                *(["logical CPUs"] if by_cores else []),
                "end-to-end img/s",
                "step alone img/s",
                "ratio",
                "data wait",
                "verdict",
            ],
            rows,
        )
        + "\n\n"
        + "\n".join(f"- {r['backend']} {r['res']}px: {r['advice']}" for r in results)
        + "\n"
    )
    paths = write_results(
        "keepup",
        {"machine": info, "args": vars(args), "results": results},
        md,
        lambda p: _chart(p, results, describe_machine(info)),
        args.out,
    )
    return md + "\nresults: " + ", ".join(str(p) for p in paths.values())


def by_cores(args, counts: list[int]) -> int:
    """`--cores`: one confined child per count (benchmarks.cores.run_counts), the results written as each ends."""
    from benchmarks.cores import run_counts

    argv = ["--data-dir", args.data_dir, "--backend", args.backend, "--res", args.res]
    argv += ["--batch-size", str(args.batch_size), "--precision", args.precision, "--arch", args.arch]
    argv += ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    argv += ["--windows", str(args.windows)]
    argv += ["--image-folder", args.image_folder] if args.image_folder else []
    argv += ["--workers", str(args.workers)] if args.workers is not None else []
    argv += ["--compile"] if args.compile else []
    info, results = machine_info(), []

    def on_result(n: int, cpus: list[int], child: dict) -> None:
        results.extend(child["results"])
        write_keepup(args, info, results)

    lost = run_counts("benchmarks.keepup_bench", argv, counts, "keepup.json", on_result, prog="rn50 bench keepup")
    if not results:
        print("rn50 bench keepup: error: no count was measured", file=sys.stderr)
        return 1
    print(write_keepup(args, info, results))
    for line in lost:
        print(f"rn50 bench keepup: not measured: {line}", file=sys.stderr)
    return 1 if lost else 0


def _chart(path: Path, results: list[dict], machine: str) -> None:
    import matplotlib.pyplot as plt

    labels = [f"{r['backend']} {r['source']}\n{r['res']}px" for r in results]
    x = range(len(results))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(results) + 2), 3.6))
    ax.bar([i - 0.2 for i in x], [r["step_alone_images_per_s"] for r in results], 0.4, label="step alone")
    ax.bar([i + 0.2 for i in x], [r["end_to_end_images_per_s"] for r in results], 0.4, label="loader + step")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title(f"keep-up, {machine}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
