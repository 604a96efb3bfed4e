"""`rn50 organize-val`: move the flat ILSVRC2012 validation images into class folders (val/<wnid>/...).

    rn50 organize-val /data/imagenet/val --csv /data/imagenet/LOC_val_solution.csv          # Kaggle release
    rn50 organize-val /data/imagenet/val --xml-dir /data/imagenet/Annotations/CLS-LOC/val   # bounding-box XMLs
    rn50 organize-val /data/imagenet/val --csv LOC_val_solution.csv --dry-run               # show the plan only

Idempotent: images already in their class folder are left alone (a second run moves nothing). An image with no label
stays where it is and is reported; a label whose image is missing is reported; neither stops the rest.
Moves are renames inside VAL_DIR, so an interrupted run leaves every file either moved or not, never half-copied.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from dataset_tools.files import DataFolderError, check_writable, is_image_file, scan_folder

WNID_RE = re.compile(r"^n\d{8}$")


class LabelError(ValueError):
    """The label source cannot be used at all (missing, unreadable, or holds no labels)."""


def labels_from_csv(path: str | Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv: `ImageId,PredictionString` with "<wnid> x0 y0 x1 y1 ..." per box."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such file (the Kaggle release calls it LOC_val_solution.csv)")
    labels = {}
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
                raise LabelError(f"{path}: expected the header 'ImageId,PredictionString', got {header}")
            for row in reader:
                if len(row) < 2 or not row[1].split():
                    continue
                wnid = row[1].split()[0]
                if WNID_RE.match(wnid):
                    labels[row[0].strip()] = wnid
    except OSError as e:
        raise LabelError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelError(
            f"{path}: not a text CSV ({type(e).__name__}); the Kaggle release's LOC_val_solution.csv is expected"
        ) from None
    if not labels:
        raise LabelError(f"{path}: no labelled rows")
    return labels


def labels_from_xml_dir(path: str | Path) -> tuple[dict[str, str], list[str]]:
    """ILSVRC2012 bounding-box annotations: one `<stem>.xml` per image, the class in `object/name`.

    Returns the labels and the XML files that could not be used (unparsable, or with no object)."""
    path = Path(path)
    if not path.is_dir():
        raise LabelError(f"{path}: not a folder (expected Annotations/CLS-LOC/val with one .xml per image)")
    labels, bad = {}, []
    for xml in sorted(path.glob("*.xml")):
        try:
            names = [n.text.strip() for n in ET.parse(xml).getroot().iter("name") if n.text]
        except ET.ParseError as e:
            bad.append(f"{xml}: unparsable XML ({e})")
            continue
        except OSError as e:
            bad.append(f"{xml}: cannot be read ({e.strerror or e})")
            continue
        wnids = [n for n in names if WNID_RE.match(n)]
        if not wnids:
            bad.append(f"{xml}: no <object><name>nXXXXXXXX</name> in it")
            continue
        labels[xml.stem] = wnids[0]
    if not labels:
        raise LabelError(f"{path}: no usable .xml annotations")
    return labels, bad


@dataclass
class Plan:
    moves: list[tuple[Path, Path]] = field(default_factory=list)
    in_place: int = 0
    unlabelled: list[str] = field(default_factory=list)  # images with no label (left where they are)
    missing: list[str] = field(default_factory=list)  # labels with no image
    conflicts: list[str] = field(default_factory=list)  # destination already taken by another file
    annotation_problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "moved": len(self.moves),
            "already_in_place": self.in_place,
            "unlabelled": self.unlabelled,
            "missing": self.missing,
            "conflicts": self.conflicts,
            "annotation_problems": self.annotation_problems,
        }


def make_plan(val_dir: Path, labels: dict[str, str]) -> Plan:
    plan = Plan()
    found: set[str] = set()
    for entry in sorted(scan_folder(val_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            # A class folder from an earlier run: images there are in place if their label agrees.
            for sub in sorted(scan_folder(entry.path), key=lambda e: e.name):
                if not sub.is_file() or not is_image_file(sub.name):
                    continue
                stem = Path(sub.name).stem
                wnid = labels.get(stem)
                if wnid is None:
                    continue  # a class folder the user made; not ours to judge
                found.add(stem)
                if wnid == entry.name:
                    plan.in_place += 1
                else:
                    plan.moves.append((Path(sub.path), val_dir / wnid / sub.name))
        elif entry.is_file() and is_image_file(entry.name):
            stem = Path(entry.name).stem
            wnid = labels.get(stem)
            if wnid is None:
                plan.unlabelled.append(entry.name)
                continue
            found.add(stem)
            plan.moves.append((Path(entry.path), val_dir / wnid / entry.name))
    # Two sources for one destination, or a destination taken by a different file: keep both, report it.
    targets: set[Path] = set()
    kept = []
    for src, dst in plan.moves:
        if dst in targets or dst.exists():
            plan.conflicts.append(f"{src} -> {dst}: destination already exists")
        else:
            targets.add(dst)
            kept.append((src, dst))
    plan.moves = kept
    plan.missing = sorted(stem for stem in labels if stem not in found)
    return plan


class MoveError(RuntimeError):
    """A move failed part way; the message says how many were done and that a second run finishes the rest."""


def apply(plan: Plan) -> None:
    for done, (src, dst) in enumerate(plan.moves):
        try:
            dst.parent.mkdir(exist_ok=True)
            os.rename(src, dst)
        except OSError as e:
            raise MoveError(
                f"moved {done} of {len(plan.moves)} images, then {src} -> {dst} failed "
                f"({e.strerror or e}); fix that and run the same command again: it moves what is left"
            ) from None


def _report_list(title: str, items: list[str], limit: int = 10) -> None:
    if not items:
        return
    print(f"{title}: {len(items)}", file=sys.stderr)
    for item in items[:limit]:
        print(f"  {item}", file=sys.stderr)
    if len(items) > limit:
        print(f"  ... and {len(items) - limit} more (see --report)", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 organize-val",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("val_dir", help="folder holding the flat ILSVRC2012_val_*.JPEG files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="LOC_val_solution.csv (Kaggle ImageNet release)")
    src.add_argument("--xml-dir", help="folder of ILSVRC2012_val_*.xml bounding-box annotations")
    p.add_argument("--dry-run", action="store_true", help="print what would move; change nothing")
    p.add_argument("--report", help="write the full summary (moved, missing, unlabelled, ...) to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    val_dir = Path(args.val_dir)
    if not val_dir.is_dir():
        print(f"rn50 organize-val: error: {val_dir}: not a folder", file=sys.stderr)
        return 2
    if args.report:
        try:
            check_writable(args.report)
        except OSError as e:
            print(
                f"rn50 organize-val: error: --report {args.report}: cannot write there ({e.strerror or e}); choose "
                "another path",
                file=sys.stderr,
            )
            return 2
    try:
        if args.csv:
            labels, problems = labels_from_csv(args.csv), []
        else:
            labels, problems = labels_from_xml_dir(args.xml_dir)
        plan = make_plan(val_dir, labels)
    except (LabelError, DataFolderError) as e:
        print(f"rn50 organize-val: error: {e}", file=sys.stderr)
        return 2
    plan.annotation_problems = problems
    if args.dry_run:
        for src, dst in plan.moves[:20]:
            print(f"would move {src} -> {dst}")
        if len(plan.moves) > 20:
            print(f"... and {len(plan.moves) - 20} more")
    else:
        try:
            apply(plan)
        except MoveError as e:
            print(f"rn50 organize-val: error: {e}", file=sys.stderr)
            return 1
    verb = "would move" if args.dry_run else "moved"
    classes = len({dst.parent.name for _, dst in plan.moves})
    print(f"{verb} {len(plan.moves)} images into {classes} class folders; {plan.in_place} already in place")
    _report_list("images with no label (left in place)", plan.unlabelled)
    _report_list("labelled images not found", plan.missing)
    _report_list("not moved: destination taken", plan.conflicts)
    _report_list("annotation files not used", plan.annotation_problems)
    if args.report:
        try:
            Path(args.report).write_text(json.dumps(plan.summary(), indent=2) + "\n")
        except OSError as e:
            print(
                f"rn50 organize-val: error: the moves are done, but --report {args.report} could not be written "
                f"({e.strerror or e})",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
