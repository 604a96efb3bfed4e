"""rn50 doctor on betons: how they store their images, and what an all-JPEG beton would cost and gain here."""

from __future__ import annotations

import json

from conftest import requires_ffcv

pytestmark = requires_ffcv


def test_doctor_reports_storage_and_the_all_jpeg_estimate(coded_betons, coded_betons_jpeg, tmp_path, capsys):
    from benchmarks.doctor import main

    out = tmp_path / "doctor.json"
    assert main(["--data-dir", str(coded_betons), "--no-probe", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    st = data["data"]["storage"]["train"]
    assert st["samples"] == 48 and 0 < st["raw"] < 48 and st["raw_bytes_mean"] > st["jpeg_bytes_mean"] > 0
    assert st["all_jpeg_bytes_estimate"] == int(48 * st["jpeg_bytes_mean"])
    assert f"{st['raw']} of 48 images raw" in text
    (line,) = [r for r in data["recommendations"] if r.startswith("all-JPEG (rn50 convert --compress-prob 1)")]
    assert "estimated from these betons' own JPEG samples" in line and "fits in 80% of RAM" in line

    assert main(["--data-dir", str(coded_betons_jpeg), "--no-probe", "--json", str(out)]) == 0
    assert "all 48 JPEG" in capsys.readouterr().out
    assert any(r.startswith("all-JPEG betons:") for r in json.loads(out.read_text())["recommendations"])


def test_gpu_and_dali_with_all_jpeg_betons_recommend_dali():
    from benchmarks.doctor import GIB, recommend

    storage = {
        "train": {
            "samples": 10,
            "raw": 0,
            "jpeg_bytes_mean": 1e5,
            "raw_bytes_mean": None,
            "stored_bytes": 10**6,
            "all_jpeg_bytes_estimate": 10**6,
        }
    }
    facts = {"betons": {"train": GIB}, "folders": {}, "disk_free_gib": 100, "storage": storage}
    info = {"cores": 16, "gpu": {"count": 1}, "memory": {"total_gib": 64.0}, "dali": True}
    assert recommend(info, facts, {})[0].startswith("loader: dali (all-JPEG betons, DALI and a GPU)")
    assert recommend({**info, "dali": False}, facts, {})[0].startswith("loader: ffcv")
    mixed = {"train": {**storage["train"], "raw": 4}}
    assert recommend(info, {**facts, "storage": mixed}, {})[0].startswith("loader: ffcv")


def test_doctor_names_an_empty_or_truncated_beton_instead_of_a_traceback(coded_betons, tmp_path, capsys):
    from benchmarks.doctor import main

    data = tmp_path / "data"
    data.mkdir()
    whole = (coded_betons / "train.beton").read_bytes()
    for content, why in ((b"", "0 bytes, too short for a .beton header"), (whole[:5000], "truncated or damaged")):
        (data / "train.beton").write_bytes(content)
        assert main(["--data-dir", str(data), "--no-probe"]) == 0
        (line,) = [x for x in capsys.readouterr().out.splitlines() if "train.beton" in x]
        assert line.startswith("data     train.beton cannot be read: ") and why in line
