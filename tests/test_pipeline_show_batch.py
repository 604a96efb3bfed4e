"""rn50 show-batch writes a picture of a batch; bad input is a one-line error with exit status 2."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from PIL import Image

from pipeline.show_batch import class_names, main


def test_writes_a_png_of_an_augmented_batch(coded_root, tmp_path, capsys):
    out = tmp_path / "batch.png"
    rc = main(["--data-dir", str(coded_root), "--backend", "torchvision", "--workers", "0", "--batch-size", "8",
               "--resolution", "32", "--augment", "autoaugment,erasing,mix", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 100
    assert "wrote" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err
    assert main(["--data-dir", str(tmp_path), "--augment", "blur", "--device", "cpu"]) == 2
    assert "unknown --augment blur" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_class_names_use_the_synset_mapping(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n")
    assert class_names(tmp_path, ["n01443537", "n09999999"]) == ["n01443537 goldfish", "n09999999"]


def test_importing_pipeline_imports_neither_ffcv_nor_dali():
    code = "import sys, pipeline; print('ffcv' in sys.modules, any(m.startswith('nvidia.dali') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_unwritable_out_is_refused_before_the_loader_is_built(coded_root, tmp_path, capsys, monkeypatch):
    import pipeline

    (tmp_path / "file.txt").write_text("x")
    built = []
    monkeypatch.setattr(pipeline, "build_loader", lambda *a, **k: built.append(a))
    assert main(["--data-dir", str(coded_root), "--backend", "torchvision", "--device", "cpu", "--out",
                 str(tmp_path / "file.txt" / "sub" / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err and "--out" in err
    assert not built


def test_full_disk_and_damaged_data_are_one_line(coded_root, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    import matplotlib.figure

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    args = ["--backend", "torchvision", "--workers", "0", "--batch-size", "4", "--resolution", "16", "--device", "cpu"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    assert main(["--data-dir", str(coded_root), *args, "--out", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err and "No space left" in err
    monkeypatch.undo()
    data = tmp_path / "data"
    shutil.copytree(coded_root, data)
    for p in (data / "train").rglob("*.JPEG"):
        p.write_bytes(b"")
    assert main(["--data-dir", str(data), *args, "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err and "cannot be decoded" in err, err
