"""LR range test: sweep, smoothing, divergence stop and suggestion math; the command writes its plot and JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from training.lr_finder import ExponentialSweep, diverged, main, smooth, suggest


def test_exponential_sweep_endpoints_and_ratio():
    s = ExponentialSweep(1e-5, 10.0, 61)
    lrs = [s.lr_at(i) for i in range(61)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == pytest.approx(10.0)
    ratios = np.array(lrs[1:]) / np.array(lrs[:-1])
    np.testing.assert_allclose(ratios, ratios[0])  # constant factor per step = exponential
    assert s.momentum_at(3) is None


def test_smoothing_is_bias_corrected_ema():
    losses = [4.0, 2.0, 3.0, 1.0]
    beta = 0.9
    out = smooth(losses, beta)
    assert out[0] == pytest.approx(4.0)  # no pull towards zero at the start
    avg = 0.0
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        assert out[i] == pytest.approx(avg / (1 - beta ** (i + 1)))
    assert smooth([2.0] * 5, 0.98) == pytest.approx([2.0] * 5)


def test_divergence_stop():
    assert not diverged([3.0], 4.0)
    assert not diverged([3.0, 1.0, 3.9], 4.0)
    assert diverged([3.0, 1.0, 4.1], 4.0)
    assert diverged([1.0, float("nan")], 4.0)


def test_suggestion_on_a_known_curve():
    # loss falls fastest near lr=0.01 and bottoms out at lr=1: a sigmoid descent, then a blow-up
    lrs = list(np.geomspace(1e-5, 10, 100))
    loss = [2.0 - 1.5 / (1 + math.exp(-3 * (math.log10(lr) + 2))) + 4 * max(0.0, math.log10(lr)) ** 2 for lr in lrs]
    s = suggest(lrs, loss)
    i_min = int(np.argmin(loss))
    assert s["lr_at_min_loss"] == pytest.approx(lrs[i_min])
    assert 0.3 < s["lr_at_min_loss"] < 1.5
    assert s["suggested_max_lr"] == s["lr_at_min_loss"]
    assert s["conservative_max_lr"] == pytest.approx(s["lr_at_min_loss"] / 10)
    assert 0.005 < s["steepest_lr"] < 0.02
    with pytest.raises(ValueError, match="fewer than 3 finite"):
        suggest([1e-3, 1e-2], [1.0, float("nan")])


def test_command_writes_plot_and_suggestion(coded_root, tmp_path):
    rc = main(
        [
            "--data-dir",
            str(coded_root),
            "--loader",
            "torchvision",
            "--arch",
            "resnet18",
            "--res",
            "16",
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--precision",
            "fp32",
            "--num-iter",
            "9",
            "--start-lr",
            "1e-4",
            "--end-lr",
            "1.0",
            "--smooth",
            "0.5",
            "--output-dir",
            str(tmp_path),
            "--run-name",
            "t",
            "--no-progress",
        ]
    )
    assert rc == 0
    result = json.loads((tmp_path / "lr_suggestion_t.json").read_text())
    assert result["iterations_run"] == len(result["lrs"]) == len(result["losses"]) <= 9
    assert result["lrs"][0] == pytest.approx(1e-4)
    assert result["suggested_max_lr"] == result["lr_at_min_loss"] and result["lr_at_min_loss"] in result["lrs"]
    assert result["conservative_max_lr"] == pytest.approx(result["suggested_max_lr"] / 10)
    assert result["global_batch"] == 8 and result["arch"] == "resnet18"
    png = tmp_path / "lr_finder_plots" / "lr_finder_t.png"
    with Image.open(png) as im:
        im.verify()


def test_bad_sweep_flags_fail_fast(capsys, tmp_path):
    assert main(["--data-dir", str(tmp_path), "--start-lr", "1", "--end-lr", "0.1"]) == 2
    assert "--start-lr < --end-lr" in capsys.readouterr().err


def test_unwritable_output_is_refused_before_the_sweep(coded_root, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    rc = main(
        [
            "--data-dir",
            str(coded_root),
            "--loader",
            "torchvision",
            "--output-dir",
            str(tmp_path / "file.txt" / "out"),
            "--run-name",
            "t",
            "--no-progress",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 lr-find: error: --output-dir") and "\n" not in err
