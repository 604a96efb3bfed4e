"""rn50 eval --weights: a plain state dict evaluates exactly as the checkpoint it came from; bad files are one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torchvision
from _export_helpers import blurpool_run, exported, without_blurpool

from training.evaluate import main

COMMON = ["--loader", "torchvision", "--workers", "0", "--precision", "fp32", "--batch-size", "7"]


@pytest.fixture
def run(tmp_path_factory, coded_root):
    out, ckpt = blurpool_run(tmp_path_factory, coded_root)
    return ckpt, exported(tmp_path_factory, ckpt, "bp")


def evaluate(tmp_path, name: str, *flags: str) -> dict:
    target = tmp_path / f"{name}.json"
    assert main([*flags, *COMMON, "--out", str(target)]) == 0
    return json.loads(target.read_text())


def test_an_exports_weights_give_the_checkpoints_numbers(run, coded_root, tmp_path, capsys):
    """The BlurPool run's export (its blur layers recognised by their keys), at the run's resolution and TTA."""
    ckpt, folder = run
    data = ["--data-dir", str(coded_root)]
    want = evaluate(tmp_path, "ckpt", "--checkpoint", str(ckpt), *data)
    capsys.readouterr()
    got = evaluate(
        tmp_path,
        "weights",
        "--weights",
        str(folder / "weights.pt"),
        "--arch",
        "resnet18",
        "--val-res",
        "48",
        "--tta",
        *data,
    )
    printed = capsys.readouterr().out
    assert "resnet18 + BlurPool state dict" in printed
    assert "preprocessing: RGB; the centre square of 0.875 x the shorter side resized to 48 px" in printed
    assert "Resize(55) + CenterCrop(48)" in printed and "mean (0.485, 0.456, 0.406)" in printed
    assert got["samples"] == want["samples"] == 16 and got["tta"] and got["val_res"] == 48
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["weights"] == str(folder / "weights.pt") and got["crop_ratio"] == 0.875


def test_a_torchvision_state_dict_gives_the_checkpoints_numbers(run, coded_root, synth_root, tmp_path):
    """A run without BlurPool: its weights saved by torchvision's own ResNet-18 evaluate as its checkpoint; --weights
    defaults to no TTA, and --crop-ratio reaches the loader (another crop of photo-like images, other numbers,
    another file name; the coded images are flat colours, the same under any crop)."""
    ckpt, _ = run
    plain = without_blurpool(ckpt, tmp_path / "plain.pt")
    model = torchvision.models.resnet18(num_classes=4)
    model.load_state_dict(torch.load(plain, weights_only=True)["model"])
    torch.save(model.state_dict(), tmp_path / "tv.pth")
    data = ["--data-dir", str(coded_root), "--val-res", "48"]
    want = evaluate(tmp_path, "ckpt", "--checkpoint", str(plain), "--no-tta", *data)
    got = evaluate(tmp_path, "tv", "--weights", str(tmp_path / "tv.pth"), "--arch", "resnet18", *data)
    assert got["tta"] is False and got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert (got["top1"], got["top5"]) == (want["top1"], want["top5"])
    photos = ["--weights", str(tmp_path / "tv.pth"), "--arch", "resnet18", "--data-dir", str(synth_root)]
    centre = evaluate(tmp_path, "centre", *photos)
    assert main([*photos, *COMMON, "--crop-ratio", "1"]) == 0
    wide = json.loads((tmp_path / "eval_tv_224px_crop1.json").read_text())
    assert centre["crop_ratio"] == 0.875 and centre["val_res"] == 224 and wide["crop_ratio"] == 1.0
    assert wide["loss"] != pytest.approx(centre["loss"], rel=1e-4)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 eval: error: ") and "\n" not in err, err
    return err


def test_bad_weights_are_one_line(run, coded_root, tmp_path, capsys):
    ckpt, folder = run
    data = ["--data-dir", str(coded_root), *COMMON]
    weights = str(folder / "weights.pt")

    def refused(*flags: str) -> str:
        assert main([*flags, *data]) == 2
        return one_line(capsys)

    torch.save(torchvision.models.resnet34(num_classes=4).state_dict(), tmp_path / "r34.pth")
    err = refused("--weights", str(tmp_path / "r34.pth"), "--arch", "resnet18")
    assert "missing keys" not in err and "unexpected keys (layer1.2.conv1.weight" in err
    assert "pass --arch resnet34" in err
    err = refused("--weights", weights, "--arch", "resnet50")
    assert "not the weights of resnet50 + BlurPool with 4 classes" in err and "pass --arch resnet18" in err
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r18_10.pth")
    assert "10 classes (fc.weight (10, 512))" in refused(
        "--weights", str(tmp_path / "r18_10.pth"), "--arch", "resnet18"
    )
    (tmp_path / "cut.pth").write_bytes((folder / "weights.pt").read_bytes()[:100_000])
    assert "damaged or truncated" in refused("--weights", str(tmp_path / "cut.pth"), "--arch", "resnet18")
    assert "pass it as --checkpoint" in refused("--weights", str(ckpt), "--arch", "resnet18")
    torch.save({"lr": 0.1}, tmp_path / "notes.pt")
    assert "not a state dict" in refused("--weights", str(tmp_path / "notes.pt"), "--arch", "resnet18")
    assert "needs --arch" in refused("--weights", weights)
    assert "--arch goes with --weights" in refused("--checkpoint", str(ckpt), "--arch", "resnet18")
    assert "--ema" in refused("--weights", weights, "--arch", "resnet18", "--ema")
    assert "--crop-ratio must be in (0, 1]" in refused("--weights", weights, "--arch", "resnet18", "--crop-ratio", "2")

    # an export names its classes: another order than the dataset's is refused, not evaluated against wrong labels
    moved = tmp_path / "export"
    shutil.copytree(folder, moved)
    names = json.loads((moved / "classes.json").read_text())
    (moved / "classes.json").write_text(json.dumps(names[::-1]))
    assert "names other classes" in refused("--weights", str(moved / "weights.pt"), "--arch", "resnet18")


def test_a_wrapped_state_dict_is_unwrapped(run, coded_root, tmp_path):
    """Training scripts often save {"state_dict": ...} with DDP's "module." prefix: read as the plain dict."""
    _, folder = run
    state = torch.load(folder / "weights.pt", weights_only=True)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.pth")
    data = ["--data-dir", str(coded_root), "--val-res", "48"]
    plain = evaluate(tmp_path, "plain", "--weights", str(folder / "weights.pt"), "--arch", "resnet18", *data)
    wrapped = evaluate(tmp_path, "wrapped", "--weights", str(tmp_path / "wrapped.pth"), "--arch", "resnet18", *data)
    assert wrapped["loss"] == plain["loss"] and wrapped["top1"] == plain["top1"]
