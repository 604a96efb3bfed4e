"""`rn50 bench data OUT` (= `python -m benchmarks.bench_data`): a dataset big enough for keep-up windows of 200+
batches inside one epoch, made in seconds: a few thousand distinct generated images, repeated.

    rn50 bench data gpu_out/data --unique 2000 --samples 56000 --classes 100

Generating and converting 56,000 distinct ImageNet-like images would take minutes on 16 cores (rn50 synth makes
~15-20 img/s per core; rn50 convert ran 1,277 img/s with 16 workers on the H100 machine), more than a GPU visit
can spend. A loader's cost per image does not depend on whether an image was seen before, as long as each sample
is a separate byte range (beton) or file (folders), so the distinct images are repeated:

- OUT/folders/train/<wnid>/: `rn50 synth` images, each hard-linked (or copied) `repeat` times under new names.
- OUT/betons/train.beton: the distinct images converted once with --compress-prob 1 (all JPEG), then the file's
  data pages repeated, its metadata and allocation table extended to match (same format, any reader sees
  `samples` samples: `repeat_beton`).
- OUT/betons_mixed/train.beton: the distinct images converted with the default --compress-prob 0.5, not repeated
  (it is there to run the raw-sample path and to measure its size per image).

Page cache: the repeated beton holds `samples` separate copies, the folders `unique` files (hard links share their
data), so both are read from memory after the first pass, as a dataset that fits in RAM would be.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from dataset_tools.beton_format import ALLOC_TABLE, FIELD_DESC, HEADER, read_index


def _align(n: int, page: int) -> int:
    return (n + page - 1) // page * page


def repeat_beton(src: str | Path, dst: str | Path, repeat: int) -> int:
    """Write `dst`: `src` with every sample repeated `repeat` times (sample i + k * n is a copy of sample i at its own
    file offset). Returns the number of samples. The data region keeps its page alignment, so FFCV's page-based
    readers see the same layout as in a converted file."""
    src, dst = Path(src), Path(dst)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    index = read_index(src)
    n, page = index.num_samples, index.page_size
    header = np.fromfile(src, dtype=HEADER, count=1)[0].copy()
    desc_bytes = len(index.field_names) * FIELD_DESC.itemsize
    meta_start = HEADER.itemsize + desc_bytes
    meta_type = index.metadata.dtype
    old_start = _align(meta_start + n * meta_type.itemsize, page)
    old_end = int(header["alloc_table_ptr"])
    table = index.alloc_table
    if len(table) and (int(table["ptr"].min()) < old_start or int((table["ptr"] + table["size"]).max()) > old_end):
        raise ValueError(f"{src}: the data does not lie between the metadata and the allocation table")
    region = _align(old_end - old_start, page)
    new_start = _align(meta_start + n * repeat * meta_type.itemsize, page)
    with open(src, "rb") as f:
        f.seek(HEADER.itemsize)
        descs = f.read(desc_bytes)
        f.seek(old_start)
        data = f.read(old_end - old_start)
    data += b"\0" * (region - len(data))
    ptr_fields = [f"f{i}" for i, kind in enumerate(index.field_kinds) if kind == "rgb_image"]
    metas, tables = [], []
    for k in range(repeat):
        shift = new_start + k * region - old_start
        meta = index.metadata.copy()
        for name in ptr_fields:
            meta[name]["data_ptr"] = meta[name]["data_ptr"] + np.uint64(shift)
        metas.append(meta)
        t = table.copy()
        t["sample_id"] = t["sample_id"] + np.uint64(k * n)
        t["ptr"] = t["ptr"] + np.uint64(shift)
        tables.append(t)
    header["num_samples"] = n * repeat
    header["alloc_table_ptr"] = new_start + repeat * region
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(descs)
        f.write(np.concatenate(metas).astype(meta_type).tobytes())
        f.write(b"\0" * (new_start - f.tell()))
        for _ in range(repeat):
            f.write(data)
        f.write(np.concatenate(tables).astype(ALLOC_TABLE).tobytes())
    os.replace(tmp, dst)
    return n * repeat


def repeat_folders(src: Path, dst: Path, repeat: int) -> int:
    """dst/<wnid>/r<k>_<name> for every file of src/<wnid>/: hard links where the file system allows, else copies."""
    count = 0
    for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        out = dst / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(class_dir.iterdir()):
            for k in range(repeat):
                target = out / f"r{k:03d}_{f.name}"
                if not target.exists():
                    try:
                        os.link(f, target)
                    except OSError:
                        shutil.copyfile(f, target)
                count += 1
    return count


def bytes_per_image(beton: Path) -> dict:
    from dataset_tools.beton_format import image_column

    column = image_column(read_index(beton))
    return {
        "samples": len(column.labels),
        "raw": column.num_raw,
        "stored_bytes_per_image": float(column.sizes.mean()),
        "file_bytes": beton.stat().st_size,
        "mean_width": float(column.widths.mean()),
        "mean_height": float(column.heights.mean()),
    }


def make_folders(
    out: Path,
    unique: int,
    samples: int,
    classes: int,
    workers: int,
    seed: int = 0,
    short_side: tuple[int, int] = (300, 500),
) -> tuple[int, int, int]:
    """The stage that needs no FFCV: the distinct images (OUT/unique/) and the repeated folders (OUT/folders/), reused
    where already made (rn50 synth keeps a folder that holds the same dataset; existing links stay). Returns
    (images per class, repeat, folder files)."""
    from dataset_tools.synth import synthesize

    per_class = max(1, unique // classes)
    repeat = max(1, -(-samples // (per_class * classes)))
    synthesize(
        out / "unique",
        num_classes=classes,
        train_per_class=per_class,
        val_per_class=0,
        seed=seed,
        workers=workers,
        min_short=short_side[0],
        max_short=short_side[1],
        progress=False,
    )
    files = repeat_folders(out / "unique" / "train", out / "folders" / "train", repeat)
    return per_class, repeat, files


def make(
    out: Path,
    unique: int,
    samples: int,
    classes: int,
    workers: int,
    seed: int = 0,
    short_side: tuple[int, int] = (300, 500),
) -> dict:
    from dataset_tools.convert import ConvertOptions, convert

    t0 = time.perf_counter()
    per_class, repeat, files = make_folders(out, unique, samples, classes, workers, seed, short_side)
    timings = {"synth_and_folders_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    for name, prob in (("unique_jpeg", 1.0), ("betons_mixed", 0.5)):
        convert(
            out / "unique", out / name, ["train"], ConvertOptions(workers=workers, compress_prob=prob, progress=False)
        )
    timings["convert_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    (out / "betons").mkdir(parents=True, exist_ok=True)
    total = repeat_beton(out / "unique_jpeg" / "train.beton", out / "betons" / "train.beton", repeat)
    shutil.copy(out / "unique_jpeg" / "classes.json", out / "betons" / "classes.json")
    timings["repeat_s"] = time.perf_counter() - t0
    facts = {
        "description": f"{per_class * classes:,} distinct rn50 synth images (short side {short_side[0]}-"
        f"{short_side[1]} px, {classes} classes) each repeated {repeat}x: {total:,} train samples",
        "unique_images": per_class * classes,
        "repeat": repeat,
        "train_samples": total,
        "folder_files": files,
        "classes": classes,
        "seed": seed,
        "seconds": {k: round(v, 1) for k, v in timings.items()},
        "beton_all_jpeg": bytes_per_image(out / "unique_jpeg" / "train.beton"),
        "beton_mixed": bytes_per_image(out / "betons_mixed" / "train.beton"),
    }
    (out / "dataset.json").write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rn50 bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (created)")
    p.add_argument("--unique", type=int, default=2000, help="distinct images (2000)")
    p.add_argument(
        "--samples",
        type=int,
        default=56000,
        help="train samples after repeating (56000: 218 batches of 256, room for a 200-batch window after warm-up)",
    )
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--short-side", default="300,500", help="min,max short side of the generated images (300,500)")
    p.add_argument(
        "--stage",
        choices=("all", "folders"),
        default="all",
        help="folders: only the images and the repeated folders, which need no FFCV (a GPU visit makes them while "
        "FFCV is still arriving); all: everything, reusing them (all)",
    )
    args = p.parse_args(argv)
    if min(args.unique, args.samples, args.classes, args.workers) < 1 or args.unique < args.classes:
        print(
            "bench_data: error: --unique, --samples, --classes, --workers must be >= 1 and --unique >= --classes",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    if (out / "dataset.json").is_file():
        print(f"bench_data: {out} is already made ({json.loads((out / 'dataset.json').read_text())['description']})")
        return 0
    short = tuple(int(x) for x in args.short_side.split(","))
    if args.stage == "folders":
        t0 = time.perf_counter()
        _, repeat, files = make_folders(out, args.unique, args.samples, args.classes, args.workers, short_side=short)
        print(
            f"bench_data: {files:,} folder files ({repeat}x repeated) in {out}/folders ({time.perf_counter() - t0:.0f} s)"
        )
        return 0
    facts = make(out, args.unique, args.samples, args.classes, args.workers, short_side=short)
    print(f"bench_data: {facts['description']} in {out} ({facts['seconds']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
