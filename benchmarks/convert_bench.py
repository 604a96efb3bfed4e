"""`rn50 bench convert`: conversion speed of `rn50 convert` against FFCV's own DatasetWriter on the same images.

    rn50 bench convert --data-dir /data/imagenet --split val --workers 16
    rn50 bench convert --data-dir data/synth --rounds 3 --out benchmarks/results

The baseline is what ffcv-imagenet's write_imagenet.py does: `DatasetWriter` over torchvision's `ImageFolder` with
`RGBImageField(write_mode='proportion', max_resolution, jpeg_quality, compress_probability)`. Both writers get the
same files, settings and process count, and run alternately (ABBA order) so drift in the machine's state -- page
cache, thermal, other load -- hits both equally; the first read of the files is done beforehand to warm the page
cache and is not timed. Reported: img/s per round, the medians, their ratio, and bytes per image of each output.
The baseline cannot skip bad files, so benchmark on a folder without any (ImageNet itself has none).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import (
    bar_chart,
    describe_machine,
    machine_info,
    markdown_table,
    median,
    out_problem,
    usable_cores,
    write_results,
)


def _ffcv_writer(root: Path, dest: Path, max_res: int | None, quality: int, prob: float, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    fields = {
        "image": RGBImageField(
            write_mode="proportion", max_resolution=max_res, jpeg_quality=quality, compress_probability=prob
        ),
        "label": IntField(),
    }
    DatasetWriter(str(dest), fields, num_workers=workers).from_indexed_dataset(ImageFolder(str(root)))


def _ours(root: Path, dest: Path, max_res: int | None, quality: int, prob: float, workers: int) -> None:
    from dataset_tools.beton_writer import write_beton
    from dataset_tools.files import scan_split

    listing = scan_split(root)
    result = write_beton(
        str(dest),
        listing.files,
        max_side=max_res,
        jpeg_quality=quality,
        compress_prob=prob,
        workers=workers,
        progress=False,
    )
    if result.skipped:
        raise SystemExit(
            f"rn50 bench convert: {len(result.skipped)} bad files in {root} (first: "
            f"{result.skipped[0]['path']}); the FFCV baseline would crash on them -- use a clean folder"
        )


def warm_page_cache(files: list[str]) -> int:
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            total += len(fh.read())
    return total


WRITERS = {"rn50 convert": _ours, "ffcv DatasetWriter": _ffcv_writer}


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(name: str, root: Path, dest: Path, max_res: int | None, quality: int, prob: float, workers: int) -> None:
    """One timed write in a fresh process: imports and start-up are excluded, and the CPU time of the writer's
    worker processes is counted (they are reaped before the second reading), so the CPU figure stays meaningful
    when other programs compete for the cores."""
    import json
    import multiprocessing

    # Imports are not part of either writer's cost (ffcv's alone takes ~10 s of numba compilation).
    import ffcv.fields  # noqa: F401
    import ffcv.writer  # noqa: F401
    import torchvision.datasets  # noqa: F401

    import dataset_tools.beton_writer  # noqa: F401

    t0, c0 = time.perf_counter(), _cpu_seconds()
    WRITERS[name](root, dest, max_res, quality, prob, workers)
    multiprocessing.active_children()  # reap finished workers so their CPU time is accounted
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "bytes": dest.stat().st_size}))


def run(root: Path, workers: int, rounds: int, max_res: int | None, quality: int, prob: float, tmp: Path) -> dict:
    import json
    import subprocess

    from dataset_tools.files import scan_split

    listing = scan_split(root)
    n = len(listing.files)
    if n == 0:
        raise SystemExit(f"rn50 bench convert: no images under {root}/<class>/")
    source_bytes = warm_page_cache([f for f, _ in listing.files])
    runs: dict[str, list[dict]] = {k: [] for k in WRITERS}
    for r in range(rounds):
        order = list(WRITERS) if r % 2 == 0 else list(WRITERS)[::-1]  # ABBA
        for name in order:
            dest = tmp / f"{name.split()[0]}_{r}.beton"
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.convert_bench",
                "--data-dir",
                str(root),
                "--split",
                ".",
                "--workers",
                str(workers),
                "--max-res",
                str(max_res or 0),
                "--jpeg-quality",
                str(quality),
                "--compress-prob",
                str(prob),
                "--child",
                name,
                "--tmp",
                str(dest),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"rn50 bench convert: {name} failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            dest.unlink(missing_ok=True)
            m = runs[name][-1]
            print(
                f"  round {r + 1}/{rounds} {name:20s} {n / m['seconds']:8.1f} img/s  "
                f"{1e3 * m['cpu_seconds'] / n:6.2f} CPU-ms/img",
                file=sys.stderr,
            )
    result = {}
    for name, ms in runs.items():
        result[name] = {
            "seconds": [m["seconds"] for m in ms],
            "images_per_s": [n / m["seconds"] for m in ms],
            "median_images_per_s": n / median([m["seconds"] for m in ms]),
            "cpu_ms_per_image": [1e3 * m["cpu_seconds"] / n for m in ms],
            "median_cpu_ms_per_image": 1e3 * median([m["cpu_seconds"] for m in ms]) / n,
            "bytes_per_image": ms[-1]["bytes"] / n,
        }
    ours, theirs = result["rn50 convert"], result["ffcv DatasetWriter"]
    return {
        "images": n,
        "classes": len(listing.classes),
        "source_mb": round(source_bytes / 1e6, 1),
        "workers": workers,
        "rounds": rounds,
        "max_res": max_res,
        "jpeg_quality": quality,
        "compress_prob": prob,
        "writers": result,
        "ratio_ours_over_ffcv": ours["median_images_per_s"] / theirs["median_images_per_s"],
        "cpu_ratio_ffcv_over_ours": theirs["median_cpu_ms_per_image"] / ours["median_cpu_ms_per_image"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench convert",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, help="ImageNet-layout root (with SPLIT/<class>/) or a split folder")
    p.add_argument("--split", default="train", help="which split folder to convert (train)")
    p.add_argument("--workers", type=int, default=usable_cores(), help="processes for both writers (all cores)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each writer, alternating (2)")
    p.add_argument("--max-res", type=int, default=500)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-prob", type=float, default=0.5)
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    p.add_argument("--tmp", help="where the test .beton files go (default: a temporary folder)")
    p.add_argument("--child", choices=list(WRITERS), help=argparse.SUPPRESS)  # internal: one timed write
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = out_problem("rn50 bench convert", args.out)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.child:
        _child(
            args.child,
            Path(args.data_dir),
            Path(args.tmp),
            args.max_res or None,
            args.jpeg_quality,
            args.compress_prob,
            args.workers,
        )
        return 0
    root = Path(args.data_dir)
    if (root / args.split).is_dir():
        root = root / args.split
    if not root.is_dir():
        print(f"rn50 bench convert: error: {root}: no such folder", file=sys.stderr)
        return 2
    info = machine_info()
    print(f"machine: {describe_machine(info)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data = run(
            root, args.workers, args.rounds, args.max_res or None, args.jpeg_quality, args.compress_prob, Path(tmp)
        )
    data["machine"] = info
    data["data_dir"] = str(root.resolve())
    w = data["writers"]
    rows = [
        [
            name,
            r["median_images_per_s"],
            ", ".join(f"{x:.0f}" for x in r["images_per_s"]),
            r["median_cpu_ms_per_image"],
            r["bytes_per_image"] / 1e3,
        ]
        for name, r in w.items()
    ]
    md = (
        f"# rn50 bench convert\n\n{describe_machine(info)}; {data['images']} images from `{data['data_dir']}`, "
        f"{data['workers']} workers, max-res {data['max_res']}, JPEG q{data['jpeg_quality']} for "
        f"{data['compress_prob']:.0%}\n\n"
        + markdown_table(["writer", "median img/s", "img/s per round", "CPU ms/image", "KB/image"], rows)
        + f"\n\nthroughput ratio rn50/ffcv: **{data['ratio_ours_over_ffcv']:.3f}** (target >= 0.95); "
        f"CPU work per image, ffcv/rn50: **{data['cpu_ratio_ffcv_over_ours']:.3f}** "
        "(CPU time counts only the work done, so it holds even when other programs share the cores)\n"
    )
    paths = write_results(
        "convert",
        data,
        md,
        lambda p: bar_chart(
            p,
            list(w),
            [r["median_images_per_s"] for r in w.values()],
            f"conversion, {describe_machine(info)}",
            "images/s (median)",
        ),
        args.out,
    )
    print(md)
    print("results: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
