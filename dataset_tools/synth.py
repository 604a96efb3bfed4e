"""`rn50 synth`: a small ImageNet-layout dataset a network can learn, generated on the CPU.

    rn50 synth data/synth --classes 10 --train-per-class 100 --val-per-class 20 --seed 0

writes
    OUT/train/<wnid>/<wnid>_<i>.JPEG
    OUT/val/<wnid>/ILSVRC2012_val_<k>.JPEG      (or flat OUT/val/*.JPEG + OUT/LOC_val_solution.csv with --flat-val)
    OUT/LOC_synset_mapping.txt                   "<wnid> <readable description>", as in the Kaggle ImageNet release
    OUT/synth.json                               the settings, and whether the run finished

OUT must be new or empty: rn50 synth never writes into another dataset. Run again with the same settings, it finishes
an interrupted run or, when the first one finished, writes nothing; --overwrite replaces a folder rn50 synth wrote
with other settings (its train/, val/, LOC_*.txt/csv and synth.json are deleted first).

Why not flat colours or white noise: a JPEG codec (and a data loader benchmark) behaves very differently on those.
Each image is built like a photograph is seen by a codec: a smooth illumination gradient, low-frequency "cloud"
variation, an oriented texture, a few objects with soft edges, a slight blur and sensor-level noise. The class decides
the palette, the texture's orientation and scale, and the object shape; each image jitters all of them, so the classes
overlap a little and a network has to learn rather than read one pixel. Sizes follow ImageNet (short side 300-500 px,
aspect ratios 3:4 .. 16:9). Every image is a pure function of (seed, split, class, index): same seed, same bytes.
"""

from __future__ import annotations

import argparse
import colorsys
import csv
import errno
import io
import json
import math
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dataset_tools.files import check_writable

SHAPES = ("ellipse", "box", "triangle", "star", "ring", "cross")
SPLIT_IDS = {"train": 1, "val": 2}
MARKER = "synth.json"
OWNED = ("train", "val", "LOC_synset_mapping.txt", "LOC_val_solution.csv", MARKER)  # what --overwrite deletes


class TargetError(ValueError):
    """The output folder cannot take this dataset; the message says why and what to do."""


@dataclass(frozen=True)
class ClassStyle:
    """What makes a class recognisable. Hues are in [0, 1), angles in radians, periods in pixels."""

    hue: float
    accent_hue: float
    saturation: float
    texture_angle: float
    texture_period: float
    shape: str

    def describe(self) -> str:
        names = [
            "red",
            "orange",
            "yellow",
            "lime",
            "green",
            "teal",
            "cyan",
            "azure",
            "blue",
            "violet",
            "magenta",
            "rose",
        ]
        colour = names[int(round(self.hue * 12)) % 12]
        accent = names[int(round(self.accent_hue * 12)) % 12]
        return f"{colour} scene, {accent} {self.shape}s, {math.degrees(self.texture_angle):.0f} deg stripes"


def class_styles(num_classes: int, seed: int) -> list[ClassStyle]:
    """Evenly spread hues (so neighbouring classes differ), the other cues drawn per class from the seed."""
    styles = []
    for c in range(num_classes):
        rng = np.random.default_rng([seed, 0x5EED, c])
        hue = (c / num_classes + rng.uniform(-0.15, 0.15) / num_classes) % 1.0
        styles.append(
            ClassStyle(
                hue=hue,
                accent_hue=(hue + rng.choice([0.33, 0.5, 0.66]) + rng.uniform(-0.05, 0.05)) % 1.0,
                saturation=float(rng.uniform(0.45, 0.85)),
                texture_angle=float(rng.uniform(0, math.pi)),
                texture_period=float(np.exp(rng.uniform(np.log(6), np.log(36)))),
                shape=SHAPES[(c + int(rng.integers(0, len(SHAPES)))) % len(SHAPES)],
            )
        )
    return styles


def make_wnids(num_classes: int, seed: int) -> list[str]:
    """WordNet-style ids ('n' + 8 digits), unique, returned sorted so class index == sorted position (ImageFolder)."""
    rng = np.random.default_rng([seed, 0x1D5])
    numbers = rng.choice(np.arange(1_000_000, 15_000_000), size=num_classes, replace=False)
    return sorted(f"n{n:08d}" for n in numbers)


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), dtype=np.float32)


def _image_size(rng: np.random.Generator, min_short: int, max_short: int) -> tuple[int, int]:
    short = int(rng.integers(min_short, max_short + 1))
    aspect = float(rng.choice([1.0, 4 / 3, 4 / 3, 3 / 2, 16 / 9])) * float(rng.uniform(0.95, 1.05))
    long = int(round(short * aspect))
    return (long, short) if rng.random() < 0.75 else (short, long)  # (width, height): mostly landscape


def _shape_polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        k, radii = 3, [r]
    elif kind == "star":
        k, radii = 10, [r, 0.45 * r]
    elif kind == "cross":
        k, radii = 12, [r, 0.42 * r, 0.42 * r]  # a plus-like 12-gon
    else:  # box
        k, radii = 4, [r]
    pts = []
    for i in range(k):
        a = angle + 2 * math.pi * i / k
        rr = radii[i % len(radii)]
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def render_image(
    style: ClassStyle, rng: np.random.Generator, min_short: int = 300, max_short: int = 500
) -> Image.Image:
    """One RGB image of a class. All randomness comes from `rng`."""
    w, h = _image_size(rng, min_short, max_short)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Illumination: a gradient between two shades of the class hue, in a random direction.
    hue = style.hue + rng.normal(0, 0.02)
    sat = style.saturation * rng.uniform(0.8, 1.1)
    c0 = _rgb(hue, sat, rng.uniform(0.55, 0.9))
    c1 = _rgb(hue + rng.normal(0, 0.04), sat * rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.5))
    d = rng.uniform(0, 2 * math.pi)
    t = (xx * math.cos(d) + yy * math.sin(d)) / max(w, h)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]

    # Low-frequency "clouds": a coarse random field upsampled smoothly (bicubic) to the image size.
    coarse = rng.normal(0, 1, size=(int(rng.integers(3, 7)), int(rng.integers(3, 7)))).astype(np.float32)
    coarse_img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    img *= 1 + 0.12 * np.asarray(coarse_img, dtype=np.float32)[..., None]

    # Surface detail: a mid-frequency random field (grain, foliage, fabric), the part of a photo that costs JPEG bytes.
    cell = int(rng.integers(2, 5))
    fine = rng.normal(0, 1, size=(h // cell + 1, w // cell + 1)).astype(np.float32)
    fine_img = Image.fromarray(fine).resize((w, h), Image.BILINEAR)
    img *= 1 + rng.uniform(0.05, 0.12) * np.asarray(fine_img, dtype=np.float32)[..., None]

    # Oriented texture: the class's stripes, jittered in angle and scale, stronger in some images than others.
    angle = style.texture_angle + rng.normal(0, math.radians(8))
    period = style.texture_period * rng.uniform(0.85, 1.15)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi)
    img *= 1 + rng.uniform(0.08, 0.22) * np.sin(phase)[..., None]

    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)

    # Objects: 1-4 of the class's shape in its accent colour, plus 0-2 neutral distractors.
    short = min(w, h)
    for i in range(int(rng.integers(1, 5)) + int(rng.integers(0, 3))):
        is_class_object = i == 0 or rng.random() < 0.7
        if is_class_object:
            kind = style.shape
            colour = _rgb(style.accent_hue + rng.normal(0, 0.03), rng.uniform(0.5, 0.95), rng.uniform(0.45, 1.0))
        else:
            kind = SHAPES[int(rng.integers(0, len(SHAPES)))]
            grey = rng.uniform(0.15, 0.85)
            colour = np.array([grey, grey, grey], dtype=np.float32) * rng.uniform(0.9, 1.1, size=3)
        fill = tuple(int(v) for v in np.clip(colour * 255, 0, 255))
        outline = tuple(int(v * 0.6) for v in fill)
        r = short * rng.uniform(0.08, 0.25)
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        if kind in ("ellipse", "ring"):
            ax, ay = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
            bbox = (cx - ax, cy - ay, cx + ax, cy + ay)
            if kind == "ellipse":
                draw.ellipse(bbox, fill=fill, outline=outline, width=2)
            else:
                draw.ellipse(bbox, outline=fill, width=max(3, int(r * 0.3)))
        else:
            draw.polygon(_shape_polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi)), fill=fill, outline=outline)

    # Optics and sensor: a little blur, then noise at the level of a well-lit photograph.
    pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.3))))
    arr = np.asarray(pil, dtype=np.float32) + rng.normal(0, rng.uniform(1.5, 4.5), size=(h, w, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue()


def write_file(path: str, data: bytes) -> None:
    """Whole or not at all: a killed run leaves no half-written JPEG under its final name."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_one(job: tuple) -> None:
    path, style, seed, split, label, index, min_short, max_short = job
    rng = np.random.default_rng([seed, SPLIT_IDS[split], label, index])
    write_file(path, encode_jpeg(render_image(style, rng, min_short, max_short), rng))


def _read_marker(out: Path) -> dict | None:
    try:
        info = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("settings"), dict) else None


def _write_marker(out: Path, settings: dict, complete: bool) -> None:
    tmp = out / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "complete": complete}, indent=1) + "\n")
    os.replace(tmp, out / MARKER)


def prepare_target(out: Path, settings: dict, overwrite: bool) -> bool:
    """Check (and with --overwrite, clear) the output folder. False when it already holds this very dataset."""
    if out.exists() and not out.is_dir():
        raise TargetError(f"{out}: a file, not a folder; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        entries = sorted(os.listdir(out))
        check_writable(out / MARKER)
    except OSError as e:
        raise TargetError(f"{out}: cannot write there ({e.strerror or e}); choose another folder") from None
    if not entries:
        return True
    info = _read_marker(out)
    if info is None:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise TargetError(f"{out}: not empty ({shown}) and not written by rn50 synth; choose a new or empty folder")
    if info["settings"] == settings:
        return not info.get("complete")  # an interrupted run is finished; a finished one is left alone
    if not overwrite:
        theirs = ", ".join(f"{k} {v}" for k, v in info["settings"].items() if settings.get(k) != v)
        raise TargetError(
            f"{out}: holds an rn50 synth dataset made with other settings ({theirs}); choose a new "
            "folder, or pass --overwrite to replace it"
        )
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return True


def plan(
    out: Path,
    num_classes: int,
    train_per_class: int,
    val_per_class: int,
    seed: int,
    flat_val: bool,
    min_short: int,
    max_short: int,
) -> tuple[list[tuple], list[str], list[tuple[str, str]]]:
    """Every file to write as a job tuple; the wnids; and (val file name, wnid) pairs for the val labels."""
    wnids = make_wnids(num_classes, seed)
    styles = class_styles(num_classes, seed)
    jobs, val_labels = [], []
    for label, wnid in enumerate(wnids):
        for i in range(train_per_class):
            path = out / "train" / wnid / f"{wnid}_{i}.JPEG"
            jobs.append((str(path), styles[label], seed, "train", label, i, min_short, max_short))
    # ILSVRC2012 numbers val images 1..50000 across classes; interleave classes the same way.
    k = 0
    for i in range(val_per_class):
        for label, wnid in enumerate(wnids):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}.JPEG"
            path = out / "val" / name if flat_val else out / "val" / wnid / name
            jobs.append((str(path), styles[label], seed, "val", label, i, min_short, max_short))
            val_labels.append((name, wnid))
    return jobs, wnids, val_labels


def synthesize(
    out: str | Path,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    seed: int = 0,
    workers: int | None = None,
    flat_val: bool = False,
    min_short: int = 300,
    max_short: int = 500,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the dataset into a new or empty folder and return a summary dict ("written": False when the folder
    already held this dataset). TargetError for a folder holding anything else (see the module's docstring)."""
    out = Path(out)
    if num_classes < 1 or train_per_class < 0 or val_per_class < 0:
        raise ValueError("need --classes >= 1 and non-negative per-class counts")
    if not 16 <= min_short <= max_short:
        raise ValueError("need 16 <= --min-short <= --max-short")
    settings = {
        "classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "flat_val": flat_val,
        "min_short": min_short,
        "max_short": max_short,
    }
    summary = {
        "out": str(out),
        "classes": num_classes,
        "train": num_classes * train_per_class,
        "val": num_classes * val_per_class,
        "seed": seed,
        "written": True,
    }
    if not prepare_target(out, settings, overwrite):
        return {**summary, "written": False}
    _write_marker(out, settings, complete=False)
    jobs, wnids, val_labels = plan(
        out, num_classes, train_per_class, val_per_class, seed, flat_val, min_short, max_short
    )
    for d in {os.path.dirname(j[0]) for j in jobs}:
        os.makedirs(d, exist_ok=True)
    (out / "val").mkdir(parents=True, exist_ok=True)
    styles = class_styles(num_classes, seed)
    with open(out / "LOC_synset_mapping.txt", "w") as f:
        for wnid, style in zip(wnids, styles):
            f.write(f"{wnid} {style.describe()}\n")
    if flat_val:
        with open(out / "LOC_val_solution.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["ImageId", "PredictionString"])
            for name, wnid in val_labels:
                # Kaggle's format: "<wnid> xmin ymin xmax ymax" per box; the boxes do not matter here.
                writer.writerow([name.rsplit(".", 1)[0], f"{wnid} 0 0 10 10"])

    workers = workers or len(os.sched_getaffinity(0))
    from dataset_tools.progress import progress as progress_bar

    bar = progress_bar(len(jobs), "synth", "img", disable=not progress)
    try:
        if workers <= 1:
            for job in jobs:
                _write_one(job)
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(_write_one, jobs, chunksize=16):
                    bar.update()
    finally:
        bar.close()  # an error line then starts on a line of its own
    _write_marker(out, settings, complete=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 synth", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", help="output folder: new or empty (created)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--train-per-class", type=int, default=100, help="training images per class (default 100)")
    p.add_argument("--val-per-class", type=int, default=20, help="validation images per class (default 20)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument(
        "--flat-val",
        action="store_true",
        help="write val/ flat with LOC_val_solution.csv, as ILSVRC2012 ships it (try rn50 organize-val)",
    )
    p.add_argument("--min-short", type=int, default=300, help="smallest short side in px (default 300)")
    p.add_argument("--max-short", type=int, default=500, help="largest short side in px (default 500)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a dataset rn50 synth wrote into OUT with other settings (never another folder)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = synthesize(
            args.out,
            args.classes,
            args.train_per_class,
            args.val_per_class,
            args.seed,
            args.workers,
            args.flat_val,
            args.min_short,
            args.max_short,
            overwrite=args.overwrite,
        )
    except ValueError as e:
        print(f"rn50 synth: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        fix = "free space there" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the folder's permissions"
        print(
            f"rn50 synth: error: cannot write {e.filename or args.out} ({e.strerror or e}); {fix} and run the "
            "same command again to finish",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"rn50 synth: interrupted; run the same command again to finish {args.out}", file=sys.stderr)
        return 130
    if not summary["written"]:
        print(f"{summary['out']} already holds this dataset (synth.json: same settings); nothing written")
        return 0
    print(
        f"wrote {summary['train']} train and {summary['val']} val images of {summary['classes']} classes "
        f"to {summary['out']} (seed {summary['seed']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
