"""rn50 organize-val from Kaggle's CSV and from the ILSVRC2012 XML annotations: moves, idempotence, reports."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from dataset_tools.organize_val import main
from dataset_tools.synth import synthesize


@pytest.fixture()
def flat_val(tmp_path) -> tuple[Path, dict[str, str]]:
    synthesize(
        tmp_path,
        num_classes=3,
        train_per_class=0,
        val_per_class=3,
        seed=5,
        workers=1,
        flat_val=True,
        min_short=32,
        max_short=40,
        progress=False,
    )
    with open(tmp_path / "LOC_val_solution.csv") as f:
        labels = {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    return tmp_path, labels


def assert_sorted(val_dir: Path, labels: dict[str, str]) -> None:
    for stem, wnid in labels.items():
        assert (val_dir / wnid / f"{stem}.JPEG").is_file(), stem
    assert not list(val_dir.glob("*.JPEG"))


def test_csv_moves_everything_and_is_idempotent(flat_val, capsys):
    root, labels = flat_val
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    assert "moved 9 images into 3 class folders" in capsys.readouterr().out
    assert_sorted(root / "val", labels)
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    assert "moved 0 images into 0 class folders; 9 already in place" in capsys.readouterr().out
    assert_sorted(root / "val", labels)


def test_xml_annotations(flat_val, tmp_path):
    root, labels = flat_val
    xml_dir = tmp_path / "Annotations"
    xml_dir.mkdir()
    for stem, wnid in labels.items():
        (xml_dir / f"{stem}.xml").write_text(
            f"<annotation><folder>val</folder><filename>{stem}</filename>"
            f"<object><name>{wnid}</name><bndbox><xmin>1</xmin></bndbox></object>"
            f"<object><name>{wnid}</name></object></annotation>"
        )
    (xml_dir / "broken.xml").write_text("<annotation><object>")
    report = tmp_path / "report.json"
    assert main([str(root / "val"), "--xml-dir", str(xml_dir), "--report", str(report)]) == 0
    assert_sorted(root / "val", labels)
    summary = json.loads(report.read_text())
    assert summary["moved"] == 9 and len(summary["annotation_problems"]) == 1


def test_missing_and_unlabelled_are_reported_not_fatal(flat_val, capsys):
    root, labels = flat_val
    stems = sorted(labels)
    (root / "val" / f"{stems[0]}.JPEG").unlink()  # labelled but missing
    (root / "val" / "ILSVRC2012_val_99999999.JPEG").write_bytes(b"x")  # present but unlabelled
    (root / "val" / ".DS_Store").write_bytes(b"x")  # ignored
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    captured = capsys.readouterr()
    assert "moved 8 images" in captured.out
    assert "labelled images not found: 1" in captured.err and stems[0] in captured.err
    assert "images with no label (left in place): 1" in captured.err
    assert (root / "val" / "ILSVRC2012_val_99999999.JPEG").is_file()
    for stem in stems[1:]:
        assert (root / "val" / labels[stem] / f"{stem}.JPEG").is_file()


def test_dry_run_changes_nothing(flat_val, capsys):
    root, _ = flat_val
    before = sorted(p.name for p in (root / "val").iterdir())
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv"), "--dry-run"]) == 0
    assert "would move 9 images" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "val").iterdir()) == before


def test_image_in_wrong_class_folder_is_moved(flat_val):
    root, labels = flat_val
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    stem = sorted(labels)[0]
    wrong = next(w for w in set(labels.values()) if w != labels[stem])
    (root / "val" / labels[stem] / f"{stem}.JPEG").rename(root / "val" / wrong / f"{stem}.JPEG")
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    assert_sorted(root / "val", labels)


def test_unusable_label_sources_fail_clearly(tmp_path, capsys):
    (tmp_path / "val").mkdir()
    assert main([str(tmp_path / "val"), "--csv", str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    assert main([str(tmp_path / "val"), "--csv", str(tmp_path / "bad.csv")]) == 2
    assert "ImageId,PredictionString" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), "--csv", str(tmp_path / "bad.csv")]) == 2


def test_unwritable_report_is_refused_before_moving(flat_val, tmp_path, capsys):
    root, _ = flat_val
    (tmp_path / "file.txt").write_text("x")
    before = sorted(p.name for p in (root / "val").iterdir())
    assert (
        main(
            [
                str(root / "val"),
                "--csv",
                str(root / "LOC_val_solution.csv"),
                "--report",
                str(tmp_path / "file.txt" / "r.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--report" in err, err
    assert sorted(p.name for p in (root / "val").iterdir()) == before


def test_unreadable_inputs_are_one_line(flat_val, tmp_path, capsys, monkeypatch):
    import dataset_tools.organize_val as ov

    root, _ = flat_val
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00garbage\x81")
    assert main([str(root / "val"), "--csv", str(tmp_path / "binary.csv")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "binary.csv" in err, err
    real = ov.os.scandir

    def denied(path="."):
        if str(path) == str(root / "val"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ov.os, "scandir", denied)
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Permission denied" in err, err


def test_a_move_that_fails_midway_is_one_line_and_a_rerun_finishes(flat_val, capsys, monkeypatch):
    import errno

    import dataset_tools.organize_val as ov

    root, labels = flat_val
    real, calls = os.rename, [0]

    def rename(src, dst):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real(src, dst)

    monkeypatch.setattr(ov.os, "rename", rename)
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "moved 3 of 9" in err and "Read-only file system" in err, err
    monkeypatch.undo()
    assert main([str(root / "val"), "--csv", str(root / "LOC_val_solution.csv")]) == 0
    assert_sorted(root / "val", labels)
