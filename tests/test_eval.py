"""rn50 eval: reproduces the run's own validation numbers from a checkpoint; refuses a dataset of other classes."""

from __future__ import annotations

import json

import pytest
from _train_helpers import records, trained_run

from training.evaluate import main

pytestmark = pytest.mark.slow  # needs the shared learning run (~40 s on 2 cores, once per session)


def test_eval_matches_the_training_runs_validation(tmp_path_factory, tmp_path):
    data, out, run = trained_run(tmp_path_factory)
    best = max(records(out, run), key=lambda r: r["val_top1"])
    target = tmp_path / "eval.json"
    rc = main(
        [
            "--checkpoint",
            str(out / "checkpoints" / run / "best.pt"),
            "--data-dir",
            str(data),
            "--loader",
            "torchvision",
            "--workers",
            "0",
            "--batch-size",
            "7",
            "--precision",
            "fp32",
            "--out",
            str(target),
        ]
    )
    assert rc == 0
    result = json.loads(target.read_text())
    assert result["samples"] == 40 and result["val_res"] == 48 and result["tta"] is False
    assert result["top1"] == pytest.approx(best["val_top1"])
    assert result["top5"] == pytest.approx(best["val_top5"])
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-4)

    rc = main(
        [
            "--checkpoint",
            str(out / "checkpoints" / run / "checkpoint.pt"),
            "--data-dir",
            str(data),
            "--loader",
            "torchvision",
            "--workers",
            "0",
            "--precision",
            "fp32",
            "--tta",
            "--val-res",
            "56",
        ]
    )
    assert rc == 0
    written = out / "checkpoints" / run / "eval_checkpoint_56px_tta.json"
    assert json.loads(written.read_text())["tta"] is True


def test_eval_refuses_other_classes_and_missing_ema(tmp_path_factory, coded_root, capsys):
    data, out, run = trained_run(tmp_path_factory)
    ckpt = out / "checkpoints" / run / "best.pt"
    assert (
        main(["--checkpoint", str(ckpt), "--data-dir", str(coded_root), "--loader", "torchvision", "--workers", "0"])
        == 2
    )
    assert "evaluate on the dataset the run used" in capsys.readouterr().err
    assert (
        main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--loader", "torchvision", "--workers", "0", "--ema"])
        == 2
    )
    assert "no EMA weights" in capsys.readouterr().err
    assert main(["--checkpoint", str(out / "nope.pt"), "--data-dir", str(data)]) == 2


def test_eval_out_unwritable_is_refused_before_evaluating(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """An --out nobody can write is one line before the evaluation (it used to be a traceback after it); a write
    that fails anyway at the end still shows the result first."""
    import training.evaluate as ev

    data, out, run = trained_run(tmp_path_factory)
    ckpt = str(out / "checkpoints" / run / "best.pt")
    (tmp_path / "file.txt").write_text("x")
    ran = []
    monkeypatch.setattr(ev, "run_eval", lambda *a: ran.append(a) or 0)
    assert main(["--checkpoint", ckpt, "--data-dir", str(data), "--out", str(tmp_path / "file.txt" / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 eval: error: --out") and "\n" not in err and not ran
    monkeypatch.undo()

    import pathlib

    def full(self, *a, **k):
        raise OSError(28, "No space left on device", str(self))

    monkeypatch.setattr(pathlib.Path, "write_text", full)
    assert (
        main(
            [
                "--checkpoint",
                ckpt,
                "--data-dir",
                str(data),
                "--loader",
                "torchvision",
                "--workers",
                "0",
                "--precision",
                "fp32",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "top-1" in captured.out and "No space left" in captured.err and "the result is above" in captured.err


def test_eval_weights_of_the_runs_export_matches_the_checkpoint(tmp_path_factory, tmp_path):
    """The learning run (no BlurPool): `rn50 export`, then its weights.pt loaded into torchvision's ResNet-18 by a
    process without this project gives the checkpoint's logits, and `rn50 eval --weights` gives the checkpoint's
    top-1/top-5/loss."""
    import torch
    from _export_helpers import checkpoint_model, logits_without_project, photo_batch

    from training.export import main as export

    data, out, run = trained_run(tmp_path_factory)
    ckpt = out / "checkpoints" / run / "best.pt"
    folder = tmp_path / "export"
    assert export([str(ckpt), "--out", str(folder)]) == 0
    card = json.loads((folder / "model_card.json").read_text())
    assert card["state_dict_loads_into"][0] == "torchvision.models.resnet18(num_classes=4)"

    images = photo_batch(data, 48, count=40)
    logits, report = logits_without_project([folder], {"val": images}, tmp_path / "fresh")
    assert report["project_modules"] == [] and "torchvision" in report["forms"][str(folder)]
    with torch.no_grad():
        expected = checkpoint_model(ckpt)(images)
    for form in ("torchvision", "pt2"):
        torch.testing.assert_close(logits[str(folder)][form]["val"], expected, rtol=1e-4, atol=1e-4)

    common = ["--data-dir", str(data), "--loader", "torchvision", "--workers", "0", "--precision", "fp32"]
    assert main(["--checkpoint", str(ckpt), *common, "--out", str(tmp_path / "ckpt.json")]) == 0
    weights = ["--weights", str(folder / "weights.pt"), "--arch", "resnet18", "--val-res", "48"]
    assert main([*weights, *common, "--out", str(tmp_path / "weights.json")]) == 0
    want, got = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ckpt", "weights"))
    assert (got["top1"], got["top5"], got["samples"]) == (want["top1"], want["top5"], want["samples"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert want["top1"] == pytest.approx(card["validation"]["top1"])  # the card's number is the checkpoint's
