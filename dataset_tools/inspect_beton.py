"""`rn50 inspect`: what is inside a .beton -- count, labels, resolutions, storage modes -- and a grid of its images.

    rn50 inspect /data/betons/train.beton --grid train_grid.png
    rn50 inspect /data/betons/train.beton --verify        # every sample against its checksum, every JPEG decoded

Reads the file's metadata table directly (no loader, no JIT compilation), so it answers in about a second even for
ImageNet. Class names come from classes.json and LOC_synset_mapping.txt beside the .beton, when they are there.
Being a diagnostic, it reports what the loaders would refuse (a beton that does not belong with classes.json, an
image that does not decode) as warnings and goes on.
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from dataset_tools.beton_folder import SPLITS, check_beton_folder, read_classes
from dataset_tools.beton_format import JPEG_MODE, RAW_MODE, BetonFormatError, BetonIndex, read_index
from dataset_tools.files import DataFolderError, check_writable

MODES = {JPEG_MODE: "jpg", RAW_MODE: "raw"}


class BetonError(ValueError):
    pass


def open_beton(path: str | Path) -> BetonIndex:
    """The index of a .beton with this project's two fields; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path}: no such file")
    try:
        index = read_index(path)
    except BetonFormatError as e:
        raise BetonError(str(e)) from None
    except OSError as e:
        raise BetonError(f"{path}: cannot be read ({e.strerror or e})") from None
    if index.field_names[:2] != ["image", "label"] or index.field_kinds[:2] != ["rgb_image", "int"]:
        raise BetonError(f"{path}: fields are {index.field_names}, expected ['image', 'label'] (made by rn50 convert?)")
    return index


def class_names(beton: Path) -> tuple[list[str] | None, str | None]:
    """(['n01440764 tench', ...] or None, a warning or None). The names are those the loaders would use
    (dataset_tools.beton_folder) for train.beton/val.beton; when the folder check fails, the warning says why and
    the names come from classes.json as it is, if it can be read."""
    wnids, warning = None, None
    split = beton.name[: -len(".beton")]
    if split in SPLITS:
        try:
            folder = check_beton_folder(beton.parent, [split])
            wnids = folder.classes if folder.source != "labels" else None
        except DataFolderError as e:
            warning = str(e)
    if wnids is None and (beton.parent / "classes.json").is_file():
        try:
            wnids = read_classes(beton.parent / "classes.json")
        except DataFolderError as e:
            warning = warning or str(e)
    if wnids is None:
        return None, warning
    mapping = {}
    synsets = beton.parent / "LOC_synset_mapping.txt"
    if synsets.is_file():
        try:
            lines = synsets.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        for line in lines:
            wnid, _, name = line.partition(" ")
            mapping[wnid] = name.split(",")[0].strip()
    return [f"{w} {mapping[w]}" if w in mapping else w for w in wnids], warning


def decode_sample(index: BetonIndex, i: int, sizes: dict[int, int] | None = None) -> tuple[np.ndarray, int]:
    """The stored image of sample `i` as RGB uint8 (H, W, 3) and its label, straight from the file."""
    from PIL import Image

    meta = index.metadata[i]
    image_meta, label = meta["f0"], int(meta["f1"])
    ptr = int(image_meta["data_ptr"])
    h, w = int(image_meta["height"]), int(image_meta["width"])
    sizes = sizes or index.sizes_by_ptr()
    with open(index.path, "rb") as f:
        f.seek(ptr)
        data = f.read(sizes[ptr])
    if int(image_meta["mode"]) == JPEG_MODE:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), label
    return np.frombuffer(data, dtype=np.uint8)[: h * w * 3].reshape(h, w, 3), label


def summarize(index: BetonIndex) -> dict:
    meta = index.metadata
    images, labels = meta["f0"], meta["f1"].astype(np.int64)
    widths, heights = images["width"].astype(np.int64), images["height"].astype(np.int64)
    counts = np.bincount(labels, minlength=int(labels.max()) + 1 if len(labels) else 0)

    def stats(a):
        if not len(a):
            return {}
        return {
            "min": int(a.min()),
            "median": float(np.median(a)),
            "mean": round(float(a.mean()), 1),
            "max": int(a.max()),
        }

    return {
        "file": str(index.path),
        "samples": index.num_samples,
        "classes_present": int((counts > 0).sum()),
        "label_range": [int(labels.min()), int(labels.max())] if len(labels) else None,
        "per_class": stats(counts[counts > 0]) if len(counts) else {},
        "width": stats(widths),
        "height": stats(heights),
        "short_side": stats(np.minimum(widths, heights)),
        "long_side": stats(np.maximum(widths, heights)),
        "storage": {name: int((images["mode"] == code).sum()) for code, name in MODES.items()},
        "file_bytes": index.path.stat().st_size,
        "label_histogram": counts.tolist(),
    }


def draw_grid(index: BetonIndex, out: str | Path, names: list[str] | None, n: int = 24, seed: int = 0) -> list[str]:
    """Write a PNG grid of `n` samples chosen by `seed`; returns a warning per sample that does not decode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = index.num_samples
    sizes = index.sizes_by_ptr()
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    cols = min(6, len(picks))
    rows = (len(picks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    warnings = []
    for ax in axes.flat:
        ax.axis("off")
    try:
        for ax, i in zip(axes.flat, picks):
            try:
                image, label = decode_sample(index, int(i), sizes)
            except Exception as e:  # damaged sample data: show the hole, name it, draw the rest
                warnings.append(f"sample {int(i)}: cannot be decoded ({type(e).__name__}: {e})")
                ax.set_title(f"#{i} undecodable", fontsize=7, color="red")
                continue
            ax.imshow(image)
            title = names[label] if names and label < len(names) else f"class {label}"
            ax.set_title(f"#{i} {title[:28]}\n{image.shape[1]}x{image.shape[0]}", fontsize=7)
        fig.suptitle(index.path.name, fontsize=10)
        fig.tight_layout()
        fig.savefig(out, dpi=90)
    finally:
        plt.close(fig)
    return warnings


def print_summary(s: dict, names: list[str] | None) -> None:
    print(
        f"{s['file']}: {s['samples']} images, {s['classes_present']} classes present, "
        f"labels {s['label_range']}, {s['file_bytes'] / 1e6:.1f} MB"
    )
    if s["per_class"]:
        pc = s["per_class"]
        print(f"  images per class: min {pc['min']}, median {pc['median']:.0f}, max {pc['max']}")
    for key in ("width", "height", "short_side"):
        st = s[key]
        if st:
            print(f"  {key:10s}: min {st['min']}, median {st['median']:.0f}, mean {st['mean']}, max {st['max']}")
    print("  storage   : " + ", ".join(f"{k} {v}" for k, v in s["storage"].items()))
    hist = s["label_histogram"]
    shown = min(len(hist), 20)

    def label(i):
        return names[i].split()[0] if names and i < len(names) else str(i)

    print(
        "  histogram : "
        + ", ".join(f"{label(i)}:{hist[i]}" for i in range(shown))
        + (f", ... ({len(hist) - shown} more classes)" if len(hist) > shown else "")
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rn50 inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("beton", help="a .beton written by rn50 convert")
    p.add_argument("--grid", help="write a PNG grid of sample images with their class names here")
    p.add_argument("--n", type=int, default=24, help="images in the grid (24)")
    p.add_argument("--seed", type=int, default=0, help="which images the grid shows (0)")
    p.add_argument("--json", help="write the summary (with the full label histogram) to this file")
    p.add_argument(
        "--verify",
        action="store_true",
        help="read every sample: its checksum against <split>.checksums.npy (written by rn50 convert), every JPEG "
        "decoded, every raw sample's size; exit 1 if any is damaged",
    )
    p.add_argument("--workers", type=int, default=0, help="processes for --verify (0: the cores this process may use)")
    return p


def print_verification(report, names: list[str] | None) -> None:
    """The summary of `dataset_tools.checksums.verify`: what was checked, then each damaged sample and the labels."""
    what = "checksums (CRC-32), JPEG decodes, raw sizes" if report.checked_sums else "JPEG decodes and raw sizes only"
    print(f"verify {report.beton}: {report.samples} samples; checked {what}")
    if report.note:
        print(f"  note: {report.note}")
    if report.ok:
        print("  OK: no damaged sample found")
        return

    def name(label: int) -> str:
        return names[label] if names and 0 <= label < len(names) else f"label {label}"

    print(f"  DAMAGED: {len(report.problems)} of {report.samples} samples (re-convert this split with rn50 convert)")
    for p in report.problems[:20]:
        print(f"  sample {p.index} ({name(p.label)}): {p.reason}")
    if len(report.problems) > 20:
        print(f"  ... and {len(report.problems) - 20} more")
    print("  by label: " + ", ".join(f"{name(k).split()[0]}: {v}" for k, v in report.by_label().items()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, target in (("--grid", args.grid), ("--json", args.json)):
        if target:
            try:
                check_writable(target)
            except OSError as e:
                print(
                    f"rn50 inspect: error: {flag} {target}: cannot write there ({e.strerror or e}); choose another "
                    "path",
                    file=sys.stderr,
                )
                return 2
    try:
        index = open_beton(args.beton)
    except BetonError as e:
        print(f"rn50 inspect: error: {e}", file=sys.stderr)
        return 2
    names, warning = class_names(Path(args.beton))
    if warning:
        print(f"rn50 inspect: warning: {warning}", file=sys.stderr)
    summary = summarize(index)
    print_summary(summary, names)
    damaged = False
    if args.verify:
        from dataset_tools.checksums import verify

        workers = args.workers if args.workers > 0 else len(os.sched_getaffinity(0))
        try:
            report = verify(args.beton, workers=workers)
        except BetonFormatError as e:
            print(f"rn50 inspect: error: {e}", file=sys.stderr)
            return 1
        print_verification(report, names)
        summary["verify"] = {
            "checked_checksums": report.checked_sums,
            "note": report.note,
            "damaged": [{"sample": p.index, "label": p.label, "reason": p.reason} for p in report.problems],
        }
        damaged = not report.ok
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
        if args.grid:
            if summary["samples"] == 0:
                print("rn50 inspect: no images to draw", file=sys.stderr)
                return 1
            for w in draw_grid(index, args.grid, names, args.n, args.seed):
                print(f"rn50 inspect: warning: {args.beton}: {w}", file=sys.stderr)
            print(f"grid: {args.grid}")
    except OSError as e:
        fix = "free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose another path"
        print(
            f"rn50 inspect: error: cannot write {e.filename or args.grid or args.json} ({e.strerror or e}); {fix}",
            file=sys.stderr,
        )
        return 1
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
