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

from benchmarks.report import bar_chart, describe_machine, machine_info, markdown_table, median, usable_cores, write_results


def _ffcv_writer(root: Path, dest: Path, max_res: int | None, quality: int, prob: float, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision.datasets import ImageFolder

    fields = {"image": RGBImageField(write_mode="proportion", max_resolution=max_res, jpeg_quality=quality,
                                     compress_probability=prob), "label": IntField()}
    DatasetWriter(str(dest), fields, num_workers=workers).from_indexed_dataset(ImageFolder(str(root)))


def _ours(root: Path, dest: Path, max_res: int | None, quality: int, prob: float, workers: int) -> None:
    from dataset_tools.beton_writer import write_beton
    from dataset_tools.files import scan_split

    listing = scan_split(root)
    result = write_beton(str(dest), listing.files, max_side=max_res, jpeg_quality=quality, compress_prob=prob,
                         workers=workers, progress=False)
    if result.skipped:
        raise SystemExit(f"rn50 bench convert: {len(result.skipped)} bad files in {root} (first: "
                         f"{result.skipped[0]['path']}); the FFCV baseline would crash on them -- use a clean folder")


def warm_page_cache(files: list[str]) -> int:
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            total += len(fh.read())
    return total


def run(root: Path, workers: int, rounds: int, max_res: int | None, quality: int, prob: float, tmp: Path) -> dict:
    from dataset_tools.files import scan_split

    listing = scan_split(root)
    n = len(listing.files)
    if n == 0:
        raise SystemExit(f"rn50 bench convert: no images under {root}/<class>/")
    source_bytes = warm_page_cache([f for f, _ in listing.files])
    writers = {"rn50 convert": _ours, "ffcv DatasetWriter": _ffcv_writer}
    times: dict[str, list[float]] = {k: [] for k in writers}
    sizes: dict[str, int] = {}
    for r in range(rounds):
        order = list(writers) if r % 2 == 0 else list(writers)[::-1]  # ABBA
        for name in order:
            dest = tmp / f"{name.split()[0]}_{r}.beton"
            t0 = time.perf_counter()
            writers[name](root, dest, max_res, quality, prob, workers)
            times[name].append(time.perf_counter() - t0)
            sizes[name] = dest.stat().st_size
            dest.unlink()
            print(f"  round {r + 1}/{rounds} {name:20s} {n / times[name][-1]:8.1f} img/s", file=sys.stderr)
    result = {name: {"seconds": t, "images_per_s": [n / x for x in t], "median_images_per_s": n / median(t),
                     "bytes_per_image": sizes[name] / n} for name, t in times.items()}
    ratio = result["rn50 convert"]["median_images_per_s"] / result["ffcv DatasetWriter"]["median_images_per_s"]
    return {"images": n, "classes": len(listing.classes), "source_mb": round(source_bytes / 1e6, 1),
            "workers": workers, "rounds": rounds, "max_res": max_res, "jpeg_quality": quality, "compress_prob": prob,
            "writers": result, "ratio_ours_over_ffcv": ratio}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rn50 bench convert", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="ImageNet-layout root (with SPLIT/<class>/) or a split folder")
    p.add_argument("--split", default="train", help="which split folder to convert (train)")
    p.add_argument("--workers", type=int, default=usable_cores(), help="processes for both writers (all cores)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each writer, alternating (2)")
    p.add_argument("--max-res", type=int, default=500)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--compress-prob", type=float, default=0.5)
    p.add_argument("--out", help="results folder (default benchmarks/results/)")
    p.add_argument("--tmp", help="where the test .beton files go (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = Path(args.data_dir)
    if (root / args.split).is_dir():
        root = root / args.split
    if not root.is_dir():
        print(f"rn50 bench convert: error: {root}: no such folder", file=sys.stderr)
        return 2
    info = machine_info()
    print(f"machine: {describe_machine(info)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        data = run(root, args.workers, args.rounds, args.max_res or None, args.jpeg_quality, args.compress_prob,
                   Path(tmp))
    data["machine"] = info
    data["data_dir"] = str(root.resolve())
    w = data["writers"]
    rows = [[name, r["median_images_per_s"], ", ".join(f"{x:.0f}" for x in r["images_per_s"]),
             r["bytes_per_image"] / 1e3] for name, r in w.items()]
    md = (f"# rn50 bench convert\n\n{describe_machine(info)}; {data['images']} images from `{data['data_dir']}`, "
          f"{data['workers']} workers, max-res {data['max_res']}, JPEG q{data['jpeg_quality']} for "
          f"{data['compress_prob']:.0%}\n\n"
          + markdown_table(["writer", "median img/s", "img/s per round", "KB/image"], rows)
          + f"\n\nratio rn50/ffcv: **{data['ratio_ours_over_ffcv']:.3f}** (target >= 0.95)\n")
    paths = write_results("convert", data, md, lambda p: bar_chart(
        p, list(w), [r["median_images_per_s"] for r in w.values()], f"conversion, {describe_machine(info)}",
        "images/s (median)"), args.out)
    print(md)
    print(f"results: {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
