"""rn50 bench loader runs every row on tiny data and writes JSON, Markdown and a chart (no timing assertions)."""

from __future__ import annotations

import json

import pytest
from conftest import requires_dali, requires_ffcv

from benchmarks.loader_bench import MIN_CPU_WINDOW_S, main

pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning")


@requires_ffcv
@requires_dali
def test_all_backends_write_results(coded_root, coded_betons, tmp_path):
    rc = main(
        [
            "--data-dir",
            str(coded_betons),
            "--image-folder",
            str(coded_root),
            "--backend",
            "all",
            "--res",
            "32",
            "--batch-size",
            "8",
            "--workers",
            "2",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "loader.json").read_text())
    assert {(r["backend"], r["source"]) for r in data["rows"]} == {
        ("ffcv", "beton"),
        ("ffcv-plain", "beton"),
        ("dali-beton", "beton"),
        ("torchvision", "folder"),
        ("dali-folder", "folder"),
    }
    for r in data["rows"]:
        assert r["images_per_epoch"] == 48 and len(r["epoch_seconds"]) == 2 and r["img_s"] > 0
        # CPU-time ticks over an epoch of milliseconds mean nothing: such an epoch's CPU figures are "too short"
        long_enough = max(r["epoch_seconds"][1:]) >= MIN_CPU_WINDOW_S
        assert (r["process_cores"] is not None) == long_enough == (r["cpu_busy_pct"] is not None), r
        if long_enough:
            assert r["process_cores"] > 0 or r["backend"] == "torchvision"  # its decoding runs in worker processes
    assert set(data["ratios"]) == {
        "ffcv / ffcv-plain @32",
        "ffcv / torchvision @32",
        "dali-folder / torchvision @32",
        "dali-beton / ffcv @32",
    }
    assert data["machine"]["cores"] >= 1 and data["settings"]["workers"] == 2
    md = (tmp_path / "loader.md").read_text()
    assert "ffcv-plain" in md and data["machine"]["cpu"] in md
    assert (tmp_path / "loader.png").stat().st_size > 0


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    assert main(["--backend", "nope", "--res", "160"]) == 2
    assert "unknown backend 'nope'" in capsys.readouterr().err
    assert main(["--backend", "torchvision", "--res", "x"]) == 2
    assert main(["--backend", "torchvision", "--image-folder", str(tmp_path), "--res", "32"]) == 2
    assert "train missing" in capsys.readouterr().err
