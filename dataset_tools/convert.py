"""`rn50 convert`: the one-time conversion of an ImageNet folder to FFCV .beton files.

    rn50 convert --data-dir /data/imagenet --out-dir /data/betons                 # ffcv-imagenet's RN50 dataset
    rn50 convert --data-dir /data/imagenet --out-dir /data/in100 --classes 100    # an ImageNet-100-style subset

reads   ROOT/train/<wnid>/*.JPEG and ROOT/val/<wnid>/*.JPEG   (sort a flat val/ first: rn50 organize-val)
writes  OUT/train.beton, OUT/val.beton   fields `image` (RGBImageField) and `label` (IntField, ImageFolder order)
        OUT/classes.json                 index -> wnid (a JSON list)
        OUT/train.checksums.npy, ...     a CRC-32 per sample of its stored image bytes (rn50 inspect --verify checks them)
        OUT/manifest.json                the class list and each beton's size and index fingerprint: what belongs together
        OUT/convert_report.json          per split: written, skipped [{path, reason}], classes, seconds, images_per_s, bytes
        OUT/LOC_synset_mapping.txt       copied when ROOT has one (class names for inspect/show-batch)

Defaults are ffcv-imagenet's ResNet-50 dataset: longer side at most 500 px, half the images JPEG q90, half raw.
Odd files (CMYK, grayscale, palette, RGBA, 16-bit, PNG inside .JPEG) become RGB; empty, truncated, undecodable and
non-image files are skipped and listed in the report with a reason.

Every split's class folders are checked before anything is written. One conversion at a time writes into OUT (a lock
that dies with its holder; a second one stops at once naming the first's pid). Each .beton is written under a
temporary name and committed when complete: first manifest.json names it, then it is renamed into place, then
classes.json follows; so whenever a conversion is killed, the folder holds a consistent set, or one that the loaders
refuse with a line saying to run the conversion again (dataset_tools.beton_folder) -- never betons beside another
conversion's class names. Converting one split keeps the other's beton when the class list is the same, and is
refused when it is not (the other beton would be left with names that are not its own).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dataset_tools import checksums
from dataset_tools.beton_folder import (
    CLASSES_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SPLITS,
    open_index,
    read_classes,
    read_manifest,
    split_entry,
)
from dataset_tools.beton_writer import WriterError, write_beton
from dataset_tools.files import DataFolderError, SplitListing, check_writable, list_classes, scan_split
from dataset_tools.locks import FolderBusy, folder_lock

REPORT_NAME = "convert_report.json"
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
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the rename commits: the content must be on disk before it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


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


def plan_split(root: Path, split: str, classes: list[str], opts: ConvertOptions) -> tuple[list[tuple[str, int]], int]:
    """The (path, label) items to write for `split` and the count of ignored entries; InputError if the split cannot
    be converted. Reads folder listings only, so every split is checked before anything is written."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise InputError(f"{split_dir}: no such folder")
    present = set(list_classes(split_dir))
    if not present:
        raise InputError(
            f"{split_dir}: no class folders; expected {split_dir}/<wnid>/*.JPEG"
            + (" (a flat val folder? sort it first: rn50 organize-val)" if split == "val" else "")
        )
    unknown = sorted(present - set(classes)) if opts.classes is None else []
    if unknown:
        raise InputError(
            f"{split_dir}: class folders not in the train split ({', '.join(unknown[:5])}"
            f"{', ...' if len(unknown) > 5 else ''}); labels would not match between splits"
        )
    listing = scan_split(split_dir, classes)
    cap = opts.per_class if split == "train" else opts.val_per_class
    items = cap_per_class(listing, cap, opts.subset_seed)
    if not items:
        raise InputError(f"{split_dir}: no images in the chosen class folders (image extensions: .JPEG .jpg .png ...)")
    return items, listing.ignored


def convert_split(
    root: Path,
    out: Path,
    split: str,
    items: list[tuple[str, int]],
    ignored: int,
    classes: list[str],
    manifest: dict,
    opts: ConvertOptions,
) -> dict:
    """Write one split under a temporary name, then commit it: manifest, beton, classes.json (in that order)."""
    final = out / f"{split}.beton"
    tmp = out / f".{split}.beton.tmp-{os.getpid()}"
    try:
        result = write_beton(
            str(tmp),
            items,
            max_side=opts.max_res,
            jpeg_quality=opts.jpeg_quality,
            compress_prob=opts.compress_prob,
            workers=opts.workers,
            seed=opts.seed + (0 if split == "train" else 1),
            chunk_size=opts.chunk_size,
            desc=split,
            progress=opts.progress,
        )
        if result.written == 0:
            raise InputError(
                f"{root / split}: none of the {len(items)} files is a usable image "
                f"(first reason: {result.skipped[0]['reason']})"
            )
        sums = checksums.compute(tmp)  # one pass over a file just written: mostly the page cache
        checksums.write(final, sums)  # 0. its checksums (a stale pair is told apart by the manifest's digest)
        manifest["splits"][split] = {**split_entry(open_index(tmp)), "checksums": checksums.manifest_entry(sums, final)}
        write_json_atomic(out / MANIFEST_NAME, manifest)  # 1. the manifest names the beton to come
        os.replace(tmp, final)  # 2. the beton
        if not (out / CLASSES_NAME).is_file() or _classes_or_none(out / CLASSES_NAME) != classes:
            write_json_atomic(out / CLASSES_NAME, classes)  # 3. its class names
    finally:
        tmp.unlink(missing_ok=True)
    size = final.stat().st_size
    return {
        "file": str(final),
        "written": result.written,
        "skipped": result.skipped,
        "ignored_non_images": ignored,
        "classes": len({label for _, label in items}),
        "seconds": round(result.seconds, 3),
        "images_per_s": round(len(items) / result.seconds, 1) if result.seconds > 0 else None,
        "bytes": size,
    }


def _classes_or_none(path: Path) -> list[str] | None:
    try:
        return read_classes(path)
    except DataFolderError:
        return None


def remove_stale_temporaries(out: Path) -> None:
    """Leftovers of killed conversions (only ours: .<split>.beton.tmp-<pid>, .<json>.tmp-<pid>). Called with the
    folder's lock held, so no conversion that could still be writing them is alive."""
    for pattern in (
        [f".{s}.beton.tmp-*" for s in SPLITS]
        + [f".{s}.checksums.npy.tmp-*" for s in SPLITS]
        + [f".{n}.tmp-*" for n in (CLASSES_NAME, MANIFEST_NAME, REPORT_NAME, SYNSET_MAPPING)]
    ):
        for stale in out.glob(pattern):
            print(f"removing {stale} left by an interrupted conversion", file=sys.stderr)
            stale.unlink(missing_ok=True)


def start_manifest(out: Path, classes: list[str], splits: list[str]) -> dict:
    """The manifest this conversion starts from. With the folder's class list unchanged it keeps vouching for the
    betons there (each is replaced as its split is committed: a run stopped half way leaves a usable folder); with
    another list, InputError when a beton of a split not being converted would be left beside names not its own."""
    try:
        existing = read_manifest(out)
    except DataFolderError:
        existing = None  # unreadable: it vouches for nothing, and is rewritten
    old_classes = (
        existing["classes"]
        if existing
        else (_classes_or_none(out / CLASSES_NAME) if (out / CLASSES_NAME).is_file() else None)
    )
    kept: dict[str, dict] = {}
    for s in SPLITS:
        beton = out / f"{s}.beton"
        if not beton.is_file():
            continue
        if old_classes == classes:
            entry = (existing or {}).get("splits", {}).get(s)
            if entry is None:  # converted before manifests existed: vouch for it if its labels fit
                with contextlib.suppress(DataFolderError):
                    candidate = split_entry(open_index(beton))
                    entry = candidate if candidate["labels"] <= len(classes) else None
            if entry is not None:
                kept[s] = entry
                continue
        if s in splits:
            continue  # replaced by this conversion
        known = f"{len(old_classes)} other classes" if old_classes and old_classes != classes else "another class list"
        raise InputError(
            f"{beton} was converted with {known}; converting only {','.join(splits)} would leave it "
            f"unusable: convert it too (--splits {','.join(s2 for s2 in SPLITS if s2 in splits or s2 == s)})"
            ", or choose another --out-dir"
        )
    return {"version": MANIFEST_VERSION, "classes": classes, "splits": kept}


def convert(data_dir: str | Path, out_dir: str | Path, splits: list[str], opts: ConvertOptions) -> dict:
    """Convert each split; returns the report (also written to OUT/convert_report.json)."""
    root, out = Path(data_dir), Path(out_dir)
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise InputError(f"{root}: {what} (--data-dir is the ImageNet root holding train/ and val/)")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out}: a file, not a folder; choose another --out-dir")
    if not splits:
        raise InputError("--splits is empty")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise InputError(f"--splits {','.join(unknown)}: the splits are train and val")
    try:  # reads folder listings only; every split is checked before anything is written
        classes = resolve_classes(root, splits, opts.classes, opts.subset_seed)
        plans = {split: plan_split(root, split, classes, opts) for split in splits}
    except OSError as e:  # pathlib's is_dir() raises on a folder it may not look into
        raise InputError(f"{e.filename or root}: cannot be read ({e.strerror or e}); check its permissions") from None

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                folder_lock(out, "rn50 convert", hint="wait for it to finish, or choose another --out-dir")
            )
            check_writable(out / MANIFEST_NAME)  # the lock file may be writable in a folder that is not
        except OSError as e:
            raise InputError(
                f"--out-dir {out}: cannot write there ({e.strerror or e}); choose another --out-dir"
            ) from None
        remove_stale_temporaries(out)
        manifest = start_manifest(out, classes, splits)
        if (root / SYNSET_MAPPING).is_file():
            copy_atomic(root / SYNSET_MAPPING, out / SYNSET_MAPPING)

        report_path = out / REPORT_NAME
        report = {}
        if manifest["splits"] and report_path.is_file():  # keep what the report says about the betons kept
            with contextlib.suppress(OSError, ValueError):
                old = json.loads(report_path.read_text())
                report = {s: old[s] for s in manifest["splits"] if s in old}
        report["settings"] = {
            "data_dir": str(root.resolve()),
            "max_res": opts.max_res,
            "jpeg_quality": opts.jpeg_quality,
            "compress_prob": opts.compress_prob,
            "workers": opts.workers,
            "classes": opts.classes,
            "per_class": opts.per_class,
            "val_per_class": opts.val_per_class,
            "subset_seed": opts.subset_seed,
            "seed": opts.seed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        for split in splits:
            items, ignored = plans[split]
            report[split] = convert_split(root, out, split, items, ignored, classes, manifest, opts)
            write_json_atomic(report_path, report)  # a finished split is recorded even if a later one fails
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 convert",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, help="ImageNet root with train/<wnid>/ and val/<wnid>/")
    p.add_argument("--out-dir", required=True, help="where the .beton files go (created)")
    p.add_argument("--splits", default="train,val", help="comma-separated (default train,val)")
    p.add_argument("--max-res", type=int, default=500, help="longer side at most this many px; 0 keeps sizes (500)")
    p.add_argument("--jpeg-quality", type=int, default=90, help="quality of the JPEG-stored half (90)")
    p.add_argument("--compress-prob", type=float, default=0.5, help="share of images stored as JPEG, rest raw (0.5)")
    p.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="processes (default: all cores, here %(default)s)",
    )
    p.add_argument("--classes", type=int, default=None, help="keep K classes, chosen by --subset-seed")
    p.add_argument("--per-class", type=int, default=None, help="at most M train images per class (seeded choice)")
    p.add_argument("--val-per-class", type=int, default=None, help="at most M val images per class (default all)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the --classes/--per-class choices (0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the JPEG-or-raw choice per image (0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def storage_note(split: str, beton: Path) -> str:
    """What the JPEG/raw mix of a written beton means for the two decoders (counted from its index)."""
    from dataset_tools.beton_format import image_column, read_index

    column = image_column(read_index(beton))
    n, raw = len(column.modes), column.num_raw
    if raw:
        return (
            f"{split}: {raw:,} of {n:,} images stored raw (decoded faster on the CPU, larger); --compress-prob 1 "
            "stores all as JPEG, about a third of the size on ImageNet (FFCV's table: 65 vs 202 GB at 512 px), "
            "which DALI decodes on the GPU (--loader auto picks it there)"
        )
    return (
        f"{split}: all {n:,} images stored as JPEG: DALI can decode this beton on the GPU (--loader auto picks it "
        "with a GPU); the ffcv backend decodes every image on the CPU"
    )


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
    opts = ConvertOptions(
        max_res=args.max_res or None,
        jpeg_quality=args.jpeg_quality,
        compress_prob=args.compress_prob,
        workers=args.workers,
        classes=args.classes,
        per_class=args.per_class,
        val_per_class=args.val_per_class,
        subset_seed=args.subset_seed,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        report = convert(args.data_dir, args.out_dir, splits, opts)
    except (InputError, DataFolderError, FolderBusy) as e:
        print(f"rn50 convert: error: {e}", file=sys.stderr)
        return 2
    except WriterError as e:
        print(f"rn50 convert: error: {e}; finished splits are kept", file=sys.stderr)
        return 1
    except OSError as e:
        where = e.filename or args.out_dir
        fix = (
            "free space there, or choose another --out-dir"
            if e.errno in (errno.ENOSPC, errno.EDQUOT)
            else "check the path and its permissions"
        )
        print(
            f"rn50 convert: error: cannot write {where} ({e.strerror or e}); {fix}; finished splits are kept",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("rn50 convert: interrupted; finished splits are kept, the unfinished one was discarded", file=sys.stderr)
        return 130
    for split in splits:
        r = report[split]
        print(
            f"{split}: wrote {r['written']} images of {r['classes']} classes to {r['file']} "
            f"({r['bytes'] / 1e6:.1f} MB, {r['images_per_s']} img/s); skipped {len(r['skipped'])}"
        )
        for s in r["skipped"][:10]:
            print(f"  skipped {s['path']}: {s['reason']}")
        if len(r["skipped"]) > 10:
            print(f"  ... and {len(r['skipped']) - 10} more")
        print(f"  {storage_note(split, Path(r['file']))}")
    print(f"report: {Path(args.out_dir) / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
