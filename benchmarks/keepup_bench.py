"""`rn50 bench keepup`: does the loader keep up with the GPU? The real loader feeding the real train step.

    rn50 bench keepup --data-dir /data/betons --backend ffcv --res 160
    rn50 bench keepup --data-dir /data/betons --image-folder /data/imagenet --backend ffcv,dali-beton,dali-folder \
        --res 160,192 --compile

For each backend and resolution it measures (1) the train step alone on synthetic tensors already on the device
(`rn50 bench step`), and (2) the same step fed by the loader, timed end to end after a warm-up that holds FFCV's JIT
compilation, cuDNN autotuning and the loader's first batches. The ratio end-to-end / step-alone is the verdict:
>= 0.95 "keeps up". The data-wait share is the host time spent waiting in `next(loader)`; because the GPU runs
queued work meanwhile, it is an upper bound on the GPU's idle time -- the ratio is the number to trust. When the
loader falls behind, the report names the first thing to change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.report import describe_machine, machine_info, markdown_table, out_problem, usable_cores, write_results
from benchmarks.step_bench import make_parts, parse_list, resolve_device, run_windows, synthetic_batches

KEEPS_UP = 0.95


def endless(loader):
    """Batches across epoch boundaries (a short benchmark may need more steps than one epoch holds)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise RuntimeError("the loader yields no batches (fewer images than one batch with drop_last?)")


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
    """The same model (compiled once) timed twice: on a synthetic batch already on the device, then fed by the
    loader. Each run has its own warm-up (compilation and cuDNN autotuning in the first, the loader's JIT and
    first batches in the second)."""
    import torch

    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from training.engine import resolve_precision

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
    parts, prec = make_parts(arch, loader.num_classes, precision, dev, compile_model, True)
    alone = run_windows(
        parts,
        dev,
        synthetic_batches(batch_size, res, loader.num_classes, prec.input_dtype, dev),
        warmup,
        steps,
        windows,
    )
    batches = endless(loader)
    fed = run_windows(parts, dev, lambda: next(batches), warmup, steps, windows)
    ratio = fed["images_per_s"] / alone["images_per_s"]
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
        "step_alone_images_per_s": alone["images_per_s"],
        "end_to_end_images_per_s": fed["images_per_s"],
        "windows_images_per_s": fed["windows_images_per_s"],
        "data_wait_share": fed["data_wait_share"],
        "ratio": ratio,
        "verdict": "keeps up" if ratio >= KEEPS_UP else "loader-bound",
        "warmup_s": {"step_alone": alone["warmup_s"], "loader_fed": fed["warmup_s"]},
        "advice": advice(loader.backend, ratio, fed["data_wait_share"], workers, usable_cores()),
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
    p.add_argument("--workers", type=int, default=usable_cores(), help="loader workers (all cores)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps first (20)")
    p.add_argument("--steps", type=int, default=30, help="steps per timed window (30)")
    p.add_argument("--windows", type=int, default=3, help="timed windows; the median is reported (3)")
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
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
    rows = [
        [
            r["backend"],
            r["source"],
            r["res"],
            r["end_to_end_images_per_s"],
            r["step_alone_images_per_s"],
            f"{r['ratio']:.2f}",
            f"{100 * r['data_wait_share']:.0f}%",
            r["verdict"],
        ]
        for r in results
    ]
    md = (
        f"# rn50 bench keepup\n\n{describe_machine(info)}; {args.arch}, batch {args.batch_size}, "
        f"{results[0]['precision']}, {'torch.compile' if args.compile else 'eager'}, {args.workers} workers, "
        f"device {results[0]['device']}\n\n"
        + markdown_table(
            ["backend", "source", "res", "end-to-end img/s", "step alone img/s", "ratio", "data wait", "verdict"], rows
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
    print(md)
    print("results: " + ", ".join(str(p) for p in paths.values()))
    return 0


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
