"""`rn50 convert`: the one-time conversion of an ImageNet folder to FFCV .beton files.

    rn50 convert --data-dir /data/imagenet --out-dir /data/betons                 # ffcv-imagenet's RN50 dataset
    rn50 convert --data-dir /data/imagenet --out-dir /data/in100 --classes 100    # an ImageNet-100-style subset

reads   ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG   (sort a flat val/ first: rn50 organize-val)
writes  OUT/train.beton, OUT/val.beton   fields `image` (RGBImageField) and `label` (IntField, ImageFolder order)
        OUT/classes.json                 index -> wnid (a JSON list)
        OUT/convert_report.json          per split: written, skipped [{path, reason}], classes, seconds, images_per_s, bytes
        OUT/LOC_synset_mapping.txt       copied when ROOT has one (class names for inspect/show-batch)

Defaults are ffcv-imagenet's ResNet-50 dataset: longer side at most 500 px, half the images JPEG q90, half raw.
Odd files (CMYK, grayscale, palette, RGBA, 16-bit, PNG inside .JPEG) become RGB; empty, truncated, undecodable and
non-image files are skipped and listed in the report with a reason. Each .beton is written under a temporary name in
OUT and renamed when complete, so a killed conversion never leaves a file that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_tools.beton_writer import WriterError, write_beton
from dataset_tools.files import SplitListing, list_classes, scan_split

REPORT_NAME = "convert_report.json"
CLASSES_NAME = "classes.json"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


class InputError(ValueError):
    """The input folder cannot be converted; the message says why and what to do."""


@dataclass(frozen=True)
class ConvertOptions:
    max_res: int | None = 500
    jpeg_quality: int = 90
    compress_prob: float = 0.5
    workers: int = 1
    classes: int | None = None  # keep this many classes (a seeded choice)
    per_class: int | None = None  # at most this many train images per class (a seeded choice)
    val_per_class: int | None = None  # at most this many val images per class (default: all)
    subset_seed: int = 0
    seed: int = 0  # the JPEG-or-raw draw
    chunk_size: int = 64
    progress: bool = True


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def choose_classes(all_classes: list[str], k: int | None, seed: int) -> list[str]:
    """All classes, or k of them chosen by `seed` (same seed, same subset), in sorted order."""
    if k is None or k >= len(all_classes):
        return list(all_classes)
    if k < 1:
        raise InputError("--classes must be >= 1")
    rng = np.random.default_rng([seed, 0xC1A5])
    return sorted(all_classes[i] for i in rng.choice(len(all_classes), size=k, replace=False))


def cap_per_class(listing: SplitListing, m: int | None, seed: int) -> list[tuple[str, int]]:
    """At most m files per class, chosen by `seed` per class and kept in ImageFolder order."""
    if m is None:
        return list(listing.files)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in listing.files:
        by_class.setdefault(item[1], []).append(item)
    out = []
    for label in sorted(by_class):
        items = by_class[label]
        if len(items) > m:
            rng = np.random.default_rng([seed, label, 0xF11E])
            items = [items[i] for i in sorted(rng.choice(len(items), size=m, replace=False))]
        out.extend(items)
    return out


def resolve_classes(root: Path, splits: list[str], k: int | None, seed: int) -> list[str]:
    """The class list every split is labelled with: train's class folders when ROOT/train exists (so val labels mean
    the same thing even when only val is converted), else the first split's."""
    reference = "train" if (root / "train").is_dir() else splits[0]
    ref_dir = root / reference
    if not ref_dir.is_dir():
        raise InputError(f"{ref_dir}: no such folder; --data-dir must hold {'/, '.join(splits)}/ with class folders")
    classes = list_classes(ref_dir)
    if not classes:
        hint = " (a flat val folder? sort it first: rn50 organize-val)" if reference == "val" else ""
        raise InputError(f"{ref_dir}: no class folders; expected {ref_dir}/<wnid>/*.JPEG{hint}")
    return choose_classes(classes, k, seed)


def convert_split(root: Path, out: Path, split: str, classes: list[str], opts: ConvertOptions) -> dict:
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no such folder")
    present = set(list_classes(split_dir))
    if not present:
        raise InputError(f"{split_dir}: no class folders; expected {split_dir}/<wnid>/*.JPEG"
                         + (" (a flat val folder? sort it first: rn50 organize-val)" if split == "val" else ""))
    unknown = sorted(present - set(classes)) if opts.classes is None else []
    if unknown:
        raise InputError(f"{split_dir}: class folders not in the train split ({', '.join(unknown[:5])}"
                         f"{', ...' if len(unknown) > 5 else ''}); labels would not match between splits")
    listing = scan_split(split_dir, classes)
    cap = opts.per_class if split == "train" else opts.val_per_class
    items = cap_per_class(listing, cap, opts.subset_seed)
    if not items:
        raise InputError(f"{split_dir}: no images in the chosen class folders (image extensions: .JPEG .jpg .png ...)")

    final = out / f"{split}.beton"
    tmp = out / f".{split}.beton.tmp-{os.getpid()}"
    try:
        result = write_beton(str(tmp), items, max_side=opts.max_res, jpeg_quality=opts.jpeg_quality,
                             compress_prob=opts.compress_prob, workers=opts.workers,
                             seed=opts.seed + (0 if split == "train" else 1), chunk_size=opts.chunk_size,
                             desc=split, progress=opts.progress)
        if result.written == 0:
            raise InputError(f"{split_dir}: none of the {len(items)} files is a usable image "
                             f"(first reason: {result.skipped[0]['reason']})")
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    size = final.stat().st_size
    return {
        "file": str(final),
        "written": result.written,
        "skipped": result.skipped,
        "ignored_non_images": listing.ignored,
        "classes": len({label for _, label in items}),
        "seconds": round(result.seconds, 3),
        "images_per_s": round(len(items) / result.seconds, 1) if result.seconds > 0 else None,
        "bytes": size,
    }


def remove_stale_temporaries(out: Path, splits: list[str]) -> None:
    """Leftovers of a killed conversion (only ours: .<split>.beton.tmp-<pid>)."""
    for split in splits:
        for stale in out.glob(f".{split}.beton.tmp-*"):
            print(f"removing {stale} left by an interrupted conversion", file=sys.stderr)
            stale.unlink(missing_ok=True)


def convert(data_dir: str | Path, out_dir: str | Path, splits: list[str], opts: ConvertOptions) -> dict:
    """Convert each split; returns the report (also written to OUT/convert_report.json)."""
    root, out = Path(data_dir), Path(out_dir)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder (--data-dir is the ImageNet root holding train/ and val/)")
    if not splits:
        raise InputError("--splits is empty")
    classes = resolve_classes(root, splits, opts.classes, opts.subset_seed)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out, splits)
    write_json_atomic(out / CLASSES_NAME, classes)
    if (root / SYNSET_MAPPING).is_file():
        shutil.copyfile(root / SYNSET_MAPPING, out / SYNSET_MAPPING)

    report_path = out / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report["settings"] = {"data_dir": str(root.resolve()), "max_res": opts.max_res, "jpeg_quality": opts.jpeg_quality,
                          "compress_prob": opts.compress_prob, "workers": opts.workers, "classes": opts.classes,
                          "per_class": opts.per_class, "val_per_class": opts.val_per_class,
                          "subset_seed": opts.subset_seed, "seed": opts.seed,
                          "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for split in splits:
        report[split] = convert_split(root, out, split, classes, opts)
        write_json_atomic(report_path, report)  # a finished split is recorded even if a later one fails
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rn50 convert", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="ImageNet root with train/<wnid>/ and val/<wnid>/")
    p.add_argument("--out-dir", required=True, help="where the .beton files go (created)")
    p.add_argument("--splits", default="train,val", help="comma-separated (default train,val)")
    p.add_argument("--max-res", type=int, default=500, help="longer side at most this many px; 0 keeps sizes (500)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the JPEG-stored half (90)")
    p.add_argument("--compress-prob", type=float, default=0.5, help="share of images stored as JPEG, rest raw (0.5)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes (default: all cores, here %(default)s)")
    p.add_argument("--classes", type=int, default=None, help="keep K classes, chosen by --subset-seed")
    p.add_argument("--per-class", type=int, default=None, help="at most M train images per class (seeded choice)")
    p.add_argument("--val-per-class", type=int, default=None, help="at most M val images per class (default all)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the --classes/--per-class choices (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the JPEG-or-raw choice per image (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    problems = []
    if not 1 <= args.jpeg_quality <= 100:
        problems.append("--jpeg-quality must be in 1..100")
    if not 0.0 <= args.compress_prob <= 1.0:
        problems.append("--compress-prob must be in [0, 1]")
    if args.max_res < 0:
        problems.append("--max-res must be >= 0")
    if args.workers < 1:
        problems.append("--workers must be >= 1")
    for name in ("per_class", "val_per_class"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1")
    if problems:
        print("rn50 convert: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    opts = ConvertOptions(max_res=args.max_res or None, jpeg_quality=args.jpeg_quality,
                          compress_prob=args.compress_prob, workers=args.workers, classes=args.classes,
                          per_class=args.per_class, val_per_class=args.val_per_class, subset_seed=args.subset_seed,
                          seed=args.seed, progress=not args.no_progress)
    try:
        report = convert(args.data_dir, args.out_dir, splits, opts)
    except InputError as e:
        print(f"rn50 convert: error: {e}", file=sys.stderr)
        return 2
    except WriterError as e:
        print(f"rn50 convert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rn50 convert: interrupted; finished splits are kept, the unfinished one was discarded", file=sys.stderr)
        return 130
    for split in splits:
        r = report[split]
        print(f"{split}: wrote {r['written']} images of {r['classes']} classes to {r['file']} "
              f"({r['bytes'] / 1e6:.1f} MB, {r['images_per_s']} img/s); skipped {len(r['skipped'])}")
        for s in r["skipped"][:10]:
            print(f"  skipped {s['path']}: {s['reason']}")
        if len(r["skipped"]) > 10:
            print(f"  ... and {len(r['skipped']) - 10} more")
    print(f"report: {Path(args.out_dir) / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
