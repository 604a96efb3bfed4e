"""rn50 synth: deterministic, ImageNet-like sizes and layout, and class content a simple model can separate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dataset_tools.synth import main, make_wnids, synthesize


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(num_classes=3, train_per_class=2, val_per_class=1, workers=1, progress=False)
    a = digest(Path(synthesize(tmp_path / "a", seed=7, **kw)["out"]))
    b = digest(
        Path(synthesize(tmp_path / "b", seed=7, workers=2, **{k: v for k, v in kw.items() if k != "workers"})["out"])
    )
    c = digest(Path(synthesize(tmp_path / "c", seed=8, **kw)["out"]))
    assert len(a) == 3 * 2 + 3 * 1
    assert a == b  # process count does not matter
    assert set(a.values()).isdisjoint(c.values())


def test_layout_names_and_sizes(tmp_path):
    synthesize(tmp_path, num_classes=3, train_per_class=4, val_per_class=2, seed=1, workers=1, progress=False)
    wnids = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert wnids == make_wnids(3, 1)
    assert all(w.startswith("n") and len(w) == 9 and w[1:].isdigit() for w in wnids)
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == wnids
    val_files = sorted((tmp_path / "val").rglob("*.JPEG"))
    assert [p.name for p in val_files][:1] == ["ILSVRC2012_val_00000001.JPEG"]
    for path in tmp_path.rglob("*.JPEG"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert 300 <= min(im.size) <= 500, (path, im.size)
    mapping = (tmp_path / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [line.split()[0] for line in mapping] == wnids


def test_looks_like_a_photo_not_flat_or_noise(tmp_path):
    synthesize(tmp_path, num_classes=2, train_per_class=3, val_per_class=0, seed=2, workers=1, progress=False)
    for path in (tmp_path / "train").rglob("*.JPEG"):
        a = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert a.std() > 8  # not a flat colour
        # Natural images are smooth at the pixel scale: neighbouring pixels correlate strongly (white noise: ~0).
        corr = np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1]
        assert 0.6 < corr < 0.999, corr
        assert path.stat().st_size > 10_000


def test_classes_are_separable_by_simple_features(tmp_path):
    """Learnable: a nearest-centroid classifier on colour statistics beats chance by far."""
    synthesize(
        tmp_path,
        num_classes=5,
        train_per_class=8,
        val_per_class=4,
        seed=3,
        workers=2,
        min_short=64,
        max_short=96,
        progress=False,
    )

    def features(path):
        a = np.asarray(Image.open(path).convert("HSV"), dtype=np.float32) / 255
        hue = a[..., 0] * 2 * np.pi
        return np.array([np.cos(hue).mean(), np.sin(hue).mean(), a[..., 1].mean(), a[..., 2].mean()])

    wnids = sorted(p.name for p in (tmp_path / "train").iterdir())
    centroids = np.stack(
        [np.mean([features(p) for p in (tmp_path / "train" / w).glob("*.JPEG")], axis=0) for w in wnids]
    )
    correct = total = 0
    for label, w in enumerate(wnids):
        for p in (tmp_path / "val" / w).glob("*.JPEG"):
            correct += int(np.argmin(((centroids - features(p)) ** 2).sum(1)) == label)
            total += 1
    assert total == 20 and correct / total >= 0.8


def test_flat_val_writes_solution_csv(tmp_path):
    synthesize(
        tmp_path, num_classes=2, train_per_class=1, val_per_class=2, seed=4, workers=1, flat_val=True, progress=False
    )
    flat = sorted(p.name for p in (tmp_path / "val").glob("*.JPEG"))
    assert len(flat) == 4
    rows = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()
    assert rows[0] == "ImageId,PredictionString" and len(rows) == 5


def test_cli_rejects_bad_counts(tmp_path, capsys):
    assert main([str(tmp_path / "x"), "--classes", "0"]) == 2
    assert "error" in capsys.readouterr().err


SMALL = [
    "--classes",
    "2",
    "--train-per-class",
    "2",
    "--val-per-class",
    "1",
    "--min-short",
    "32",
    "--max-short",
    "40",
    "--workers",
    "1",
]


def test_an_existing_dataset_is_not_overwritten(tmp_path, capsys):
    """Synth into an existing dataset used to replace its images, add a class and lose its names, with rc 0."""
    data = tmp_path / "imagenet"
    (data / "train" / "n01440764").mkdir(parents=True)
    (data / "train" / "n01440764" / "a.JPEG").write_bytes(b"a real photo")
    (data / "LOC_synset_mapping.txt").write_text("n01440764 tench\n")
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only what rn50 synth wrote
        assert main([str(data), *SMALL, *extra]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(data) in err, err
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before


def test_rerun_and_overwrite_of_a_synth_folder(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([str(out), *SMALL]) == 0
    first = digest(out)
    assert main([str(out), *SMALL]) == 0  # the same settings again: nothing to do (a second `make demo`)
    assert "already" in capsys.readouterr().out and digest(out) == first
    other = [a if a != "2" else "3" for a in SMALL]  # 3 classes, 3 per class
    assert main([str(out), *other]) == 2  # other settings: refused ...
    assert "--overwrite" in capsys.readouterr().err and digest(out) == first
    assert main([str(out), *other, "--overwrite"]) == 0  # ... unless asked: replaced, nothing left of the first
    assert len(list((out / "train").iterdir())) == 3 and len(digest(out)) == 3 * 3 + 3
    assert len((out / "LOC_synset_mapping.txt").read_text().splitlines()) == 3


def test_unwritable_or_full_output_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import dataset_tools.synth as synth

    (tmp_path / "file.txt").write_text("x")
    assert main([str(tmp_path / "file.txt" / "sub"), *SMALL]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "file.txt" in err, err

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(synth, "write_file", full)
    assert main([str(tmp_path / "full"), *SMALL]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "rn50 synth" in line]  # not the progress bar
    assert len(err) == 1 and err[0].startswith("rn50 synth: error:") and "No space left on device" in err[0], err
