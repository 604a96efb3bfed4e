"""rn50 show-batch writes a picture of a batch as the trainer sees it; bad input is a one-line error with exit 2."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from PIL import Image

from training.show_batch import class_names, main


def test_writes_a_png_of_an_augmented_batch(coded_root, tmp_path, capsys):
    out = tmp_path / "batch.png"
    rc = main(
        [
            "--data-dir",
            str(coded_root),
            "--loader",
            "torchvision",
            "--workers",
            "0",
            "--images",
            "8",
            "--res",
            "32",
            "--auto-augment",
            "autoaugment",
            "--random-erase",
            "0.5",
            "--mixup",
            "0.2",
            "--cutmix",
            "1.0",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    with Image.open(out) as im:
        assert im.size[0] > 200 and im.size[1] > 100
    assert "wrote" in capsys.readouterr().out


def test_shows_what_the_trainer_gets(coded_root, monkeypatch, tmp_path):
    """The picture's batch is the trainer's: the config's loader at the epoch's resolution, then the same recipe
    (training.components.make_recipe) with the same seed for (epoch, batch 0)."""
    import torch

    from training import show_batch
    from training.components import make_loader, make_recipe
    from training.config import TrainConfig
    from training.distributed import DistContext

    shown = {}
    monkeypatch.setattr(show_batch, "draw", lambda images, targets, *a: shown.update(images=images, targets=targets))
    argv = [
        "--data-dir",
        str(coded_root),
        "--loader",
        "torchvision",
        "--workers",
        "0",
        "--images",
        "8",
        "--min-res",
        "24",
        "--max-res",
        "40",
        "--start-ramp",
        "0",
        "--end-ramp",
        "2",
        "--res-step",
        "8",
        "--auto-augment",
        "trivialaugment",
        "--cutmix",
        "1.0",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--epoch",
        "1",
    ]
    assert main(argv + ["--out", str(tmp_path / "b.png")]) == 0
    cfg = TrainConfig(
        data_dir=str(coded_root),
        loader="torchvision",
        workers=0,
        min_res=24,
        max_res=40,
        start_ramp=0,
        end_ramp=2,
        res_step=8,
        auto_augment="trivialaugment",
        cutmix=1.0,
        seed=5,
        device="cpu",
    )
    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    loader = make_loader(cfg, "train", ctx, torch.float32, resolution=32, batch_size=8)
    loader.set_epoch(1)
    images, labels = next(iter(loader))
    expected = make_recipe(cfg, loader.num_classes)(images, labels, epoch=1, batch=0)
    assert shown["images"].shape == (8, 3, 32, 32)
    assert torch.equal(shown["images"], expected[0]) and torch.equal(shown["targets"], expected[1])


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err
    assert main(["--data-dir", str(tmp_path), "--random-erase", "2", "--device", "cpu"]) == 2
    assert "--random-erase must be in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_class_names_use_the_synset_mapping(tmp_path):
    (tmp_path / "LOC_synset_mapping.txt").write_text("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius\n")
    assert class_names(tmp_path, ["n01443537", "n09999999"]) == ["n01443537 goldfish", "n09999999"]


def test_importing_pipeline_imports_neither_ffcv_nor_dali():
    code = "import sys, pipeline; print('ffcv' in sys.modules, any(m.startswith('nvidia.dali') for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_unwritable_out_is_refused_before_the_loader_is_built(coded_root, tmp_path, capsys, monkeypatch):
    from training import components

    (tmp_path / "file.txt").write_text("x")
    built = []
    monkeypatch.setattr(components, "build_loader", lambda *a, **k: built.append(a))
    assert (
        main(
            [
                "--data-dir",
                str(coded_root),
                "--loader",
                "torchvision",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "file.txt" / "sub" / "b.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 show-batch: error:") and "\n" not in err and "--out" in err
    assert not built


def test_full_disk_and_damaged_data_are_one_line(coded_root, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    import matplotlib.figure

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    args = ["--loader", "torchvision", "--workers", "0", "--images", "4", "--res", "16", "--device", "cpu"]
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
