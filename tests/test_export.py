"""rn50 export: the folder, its card, each form's logits in a process without this project, and the refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _export_helpers import (
    blurpool_run,
    checkpoint_model,
    exported,
    logits_without_project,
    photo_batch,
    without_blurpool,
)
from _train_helpers import records

from training.export import main


@pytest.fixture
def bp(tmp_path_factory, coded_root):
    """(output dir, best.pt, export folder) of the BlurPool run."""
    out, ckpt = blurpool_run(tmp_path_factory, coded_root)
    return out, ckpt, exported(tmp_path_factory, ckpt, "bp")


@pytest.fixture
def plain(tmp_path_factory, coded_root):
    """(checkpoint, export folder) of the same run's weights in a run without BlurPool."""
    out, ckpt = blurpool_run(tmp_path_factory, coded_root)
    target = ckpt.with_name("plain.pt")
    if not target.exists():
        without_blurpool(ckpt, target)
    return target, exported(tmp_path_factory, target, "plain")


def one_line(err: str) -> str:
    err = err.strip()
    assert err.startswith("rn50 export: error: ") and "\n" not in err, err
    return err


def test_the_folder_and_its_model_card(bp, coded_root):
    out, ckpt, folder = bp
    assert sorted(p.name for p in folder.iterdir()) == [
        "MODEL_CARD.md",
        "classes.json",
        "model.pt2",
        "model_card.json",
        "weights.pt",
    ]
    assert not list(folder.parent.glob(".*")), "a temporary folder was left behind"
    classes = sorted(p.name for p in (coded_root / "val").iterdir())
    assert json.loads((folder / "classes.json").read_text()) == classes
    state = torch.load(folder / "weights.pt", weights_only=True)
    assert any(k.endswith(".blur_filter") for k in state) and all(v.is_contiguous() for v in state.values())

    card = json.loads((folder / "model_card.json").read_text())
    record = records(out, "bp")[-1]
    assert card["format"] == "rn50-export/1" and card["arch"] == "resnet18" and card["blurpool"] is True
    assert card["num_classes"] == 4 and card["classes"] == classes and card["weights"] == "model"
    assert card["state_dict_loads_into"] == [] and "use model.pt2" in card["blurpool_note"]
    assert card["training"]["epochs_trained"] == 1 and card["training"]["config"]["blurpool"] is True
    assert card["training"]["config"]["max_lr"] == 0.05
    val = card["validation"]
    assert val["top1"] == pytest.approx(record["val_top1"]) and val["top5"] == pytest.approx(record["val_top5"])
    assert val["resolution"] == 48 and val["tta"] is True and val["samples"] == 16 and val["epoch"] == 0
    assert card["hardware"].startswith("1 x CPU") and card["wall_time_s"] == pytest.approx(record["epoch_time_s"])
    assert card["data"]["manifest"] is None and "no manifest.json" in card["data"]["note"]  # image folders
    pre = card["preprocessing"]
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    assert pre["resolution"] == 48 and pre["crop_ratio"] == 0.875 and "RGB" in pre["input"]
    assert "Resize(55), transforms.CenterCrop(48)" in pre["torchvision_equivalent"]
    md = (folder / "MODEL_CARD.md").read_text()
    for text in ("## Preprocessing", "## Validation", f"top-1 {record['val_top1']:.2f} %", "flip TTA", "hardware"):
        assert text in md


def test_each_form_gives_the_checkpoints_logits_without_this_project(bp, plain, synth_root, tmp_path):
    """weights.pt into torchvision's own ResNet (runs without BlurPool) and model.pt2 (every run), loaded by an
    interpreter that cannot import this project, give the logits of the checkpoint's model on the same batches:
    photo-like images prepared as the card says at the run's resolution, and a batch of another size and shape
    (the program's free dimensions)."""
    gen = torch.Generator().manual_seed(1)
    batches = {"val": photo_batch(synth_root, 48), "other": torch.randn(3, 3, 64, 40, generator=gen)}
    (_, bp_ckpt, bp_folder), (plain_ckpt, plain_folder) = bp, plain
    logits, report = logits_without_project([bp_folder, plain_folder], batches, tmp_path / "fresh")
    assert report["project_modules"] == []
    assert report["forms"][str(bp_folder)][:1] == ["pt2"]
    assert report["forms"][str(plain_folder)][:2] == ["pt2", "torchvision"]
    for ckpt, folder in ((bp_ckpt, bp_folder), (plain_ckpt, plain_folder)):
        model = checkpoint_model(ckpt)
        for form, by_batch in logits[str(folder)].items():
            for name, x in batches.items():
                with torch.no_grad():
                    want = model(x)
                scale = float(want.abs().max())
                torch.testing.assert_close(
                    by_batch[name], want, rtol=1e-4, atol=1e-4 * scale, msg=f"{folder.name} {form} {name}"
                )
    # the two checkpoints are different networks: the comparison could tell them apart
    assert not torch.allclose(logits[str(bp_folder)]["pt2"]["val"], logits[str(plain_folder)]["pt2"]["val"])


def test_a_plain_export_loads_into_timm(plain):
    timm = pytest.importorskip("timm")  # timm's ResNets use torchvision's key names; checked where it is installed
    ckpt, folder = plain
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    model.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), checkpoint_model(ckpt)(x), rtol=1e-4, atol=1e-4)


def test_an_existing_folder_is_refused_and_overwrite_replaces_only_exports(bp, plain, tmp_path, capsys):
    _, bp_ckpt, _ = bp
    plain_ckpt, _ = plain
    target = tmp_path / "model"
    assert main([str(bp_ckpt), "--out", str(target)]) == 0
    before = (target / "model_card.json").read_bytes()
    capsys.readouterr()

    assert main([str(plain_ckpt), "--out", str(target)]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert (target / "model_card.json").read_bytes() == before

    assert main([str(plain_ckpt), "--out", str(target), "--overwrite"]) == 0
    assert json.loads((target / "model_card.json").read_text())["blurpool"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the old one and the temporary are gone

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main([str(plain_ckpt), "--out", str(other), "--overwrite"]) == 2
    assert "not an rn50 export" in one_line(capsys.readouterr().err)
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert main([str(plain_ckpt), "--out", str(tmp_path / "file"), "--overwrite"]) == 2
    assert "a file, not a folder" in one_line(capsys.readouterr().err)


def test_a_full_disk_is_one_line_and_keeps_the_previous_export(bp, tmp_path, capsys, monkeypatch):
    _, ckpt, _ = bp
    target = tmp_path / "model"
    assert main([str(ckpt), "--out", str(target)]) == 0
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.name != "model.pt2"}
    capsys.readouterr()

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    assert main([str(ckpt), "--out", str(target), "--overwrite"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "could not write the export (" in err and "file write failed" in err and "previous export is intact" in err
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.name != "model.pt2"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_bad_checkpoints_are_one_line_and_write_nothing(bp, tmp_path, capsys):
    _, ckpt, _ = bp
    target = tmp_path / "out"
    assert main([str(tmp_path / "nope.pt"), "--out", str(target)]) == 2
    assert "no such file" in one_line(capsys.readouterr().err)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 3])
    assert main([str(truncated), "--out", str(target)]) == 2
    assert "damaged or truncated" in one_line(capsys.readouterr().err)
    assert main([str(ckpt), "--out", str(target), "--ema"]) == 2
    assert "no EMA weights" in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.pt"]


def _dead_pid() -> int:
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1 if Path("/proc/sys/kernel/pid_max").exists() else 2**30


def test_a_killed_overwrite_loses_no_export(bp, tmp_path, capsys):
    """Killed between moving the previous export aside and putting the new one in place: the next export into that
    folder moves the previous one back (and removes the unfinished one) before anything else."""
    _, ckpt, folder = bp
    target = tmp_path / "model"
    pid = _dead_pid()
    shutil.copytree(folder, tmp_path / f".model.old-{pid}")
    (tmp_path / f".model.tmp-{pid}").mkdir()
    (tmp_path / f".model.tmp-{pid}" / "weights.pt").write_bytes(b"half")
    assert main([str(ckpt), "--out", str(target)]) == 2  # restored, so it exists: refused without --overwrite
    captured = capsys.readouterr()
    assert "restored" in captured.out and "--overwrite" in one_line(captured.err)
    assert (target / "model_card.json").read_bytes() == (folder / "model_card.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_the_card_holds_the_manifest_fingerprint(bp, coded_betons, tmp_path):
    """A run on betons: the card names each split's fingerprint from the data folder's manifest.json."""
    from training.checkpoint import atomic_save, load_checkpoint

    _, ckpt, _ = bp
    state = load_checkpoint(ckpt)
    state["config"] = {**state["config"], "data_dir": str(coded_betons)}
    on_betons = tmp_path / "checkpoints" / "bp" / "best.pt"
    atomic_save(state, on_betons)
    assert main([str(on_betons), "--out", str(tmp_path / "model")]) == 0
    card = json.loads((tmp_path / "model" / "model_card.json").read_text())
    manifest = json.loads((coded_betons / "manifest.json").read_text())
    assert card["data"]["manifest"]["splits"]["val"]["index"] == manifest["splits"]["val"]["index"]
    assert card["data"]["manifest"]["splits"]["train"]["samples"] == manifest["splits"]["train"]["samples"]
    assert "fingerprints train" in (tmp_path / "model" / "MODEL_CARD.md").read_text()
    assert card["hardware"].startswith("1 x CPU")  # the logs where the config's output_dir says
    assert os.path.exists(tmp_path / "model" / "model.pt2")
