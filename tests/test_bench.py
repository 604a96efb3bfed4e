"""Benchmarks and doctor, run tiny on the CPU: they must produce valid JSON, Markdown and PNG (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import requires_ffcv
from PIL import Image

TINY = ["--batch-size", "4", "--warmup", "1", "--steps", "1", "--windows", "2", "--arch", "resnet18"]


def check_outputs(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert md.startswith(f"# rn50 bench {name}") and "| " in md
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert data["machine"]["cpu"] in md  # every table names its hardware
    with Image.open(out / f"{name}.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    return data


def test_bench_step_cpu(tmp_path):
    from training.cli import main as rn50

    assert (
        rn50(
            ["bench", "step", "--res", "32,48", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path)] + TINY
        )
        == 0
    )
    data = check_outputs(tmp_path, "step")
    assert [r["res"] for r in data["results"]] == [32, 48]
    for r in data["results"]:
        assert len(r["windows_images_per_s"]) == 2 and r["images_per_s"] > 0 and r["device"] == "cpu"


def test_bench_step_rejects_bad_res(capsys):
    from benchmarks.step_bench import main

    assert main(["--res", "abc"]) == 2
    assert "--res" in capsys.readouterr().err
    assert main(["--res", "32", "--levers", "warp-speed"]) == 2
    assert "unknown lever 'warp-speed'" in capsys.readouterr().err


@pytest.mark.slow  # one eager ResNet run per lever on the CPU (~35-65 s on 2 cores)
def test_bench_step_levers_one_row_each(tmp_path):
    """The levers that run without a GPU or a compiler, each against its own input form: uint8 NHWC for
    normalize-inside, 4 channels for pad4."""
    from benchmarks.step_bench import lever
    from training.cli import main as rn50

    args = [
        "bench",
        "step",
        "--res",
        "32",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--levers",
        "eager,fused,normalize-inside,pad4",
        "--out",
        str(tmp_path),
    ] + TINY
    assert rn50(args) == 0
    rows = {r["lever"]: r for r in check_outputs(tmp_path, "step")["results"]}
    assert list(rows) == ["eager", "fused", "normalize-inside", "pad4"]
    assert rows["normalize-inside"]["input"] == "uint8 NHWC" and rows["pad4"]["input"] == "4 channels"
    assert rows["fused"]["sgd"] == "fused" and rows["eager"]["mode"] == "eager"
    assert all(r["images_per_s"] > 0 and r["vs_compile"] is None for r in rows.values())
    assert lever("bs512").batch_size == 512 and lever("best", 384) == lever("best", 384)
    assert (lever("best", 384).mode, lever("best", 384).sgd, lever("best", 384).batch_size) == ("graphs", "fused", 384)


def test_pad4_stem_computes_the_same_function():
    import torch

    from benchmarks.step_bench import NormalizedInput, pad_stem_to_4_channels
    from pipeline.contract import normalize_nhwc
    from training.model import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 4).eval()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    padded = torch.cat([x, torch.zeros(2, 1, 32, 32)], 1).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(pad_stem_to_4_channels(model)(padded), expected)
    pixels = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    model = build_model("resnet18", 4).eval()
    torch.testing.assert_close(NormalizedInput(model, torch.float32)(pixels), model(normalize_nhwc(pixels)))


@requires_ffcv
def test_bench_keepup_cpu(tmp_path, coded_betons):
    from training.cli import main as rn50

    args = [
        "bench",
        "keepup",
        "--data-dir",
        str(coded_betons),
        "--backend",
        "ffcv",
        "--res",
        "32",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--out",
        str(tmp_path),
    ] + TINY
    assert rn50(args) == 0
    data = check_outputs(tmp_path, "keepup")
    (r,) = data["results"]
    assert r["backend"] == "ffcv" and r["res"] == 32
    assert r["ratio"] == pytest.approx(r["end_to_end_images_per_s"] / r["step_alone_images_per_s"])
    assert 0 <= r["data_wait_share"] <= 1 and r["verdict"] in ("keeps up", "loader-bound") and r["advice"]


def test_keepup_advice_names_the_first_fix():
    from benchmarks.keepup_bench import advice

    assert advice("ffcv", 0.99, 0.01, 8, 8).startswith("nothing")
    assert "rn50 convert" in advice("torchvision", 0.5, 0.6, 8, 8)
    assert "--workers from 4 to 16" in advice("ffcv", 0.7, 0.4, 4, 16)
    assert "--compress-prob" in advice("ffcv", 0.7, 0.4, 16, 16)
    assert "hw_decoder_load" in advice("dali", 0.7, 0.4, 16, 16)


@requires_ffcv
def test_bench_convert_tiny(tmp_path, coded_root):
    from training.cli import main as rn50

    assert (
        rn50(
            [
                "bench",
                "convert",
                "--data-dir",
                str(coded_root),
                "--workers",
                "1",
                "--rounds",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    data = check_outputs(tmp_path, "convert")
    assert data["images"] == 48
    for writer in ("rn50 convert", "ffcv DatasetWriter"):
        w = data["writers"][writer]
        assert w["median_images_per_s"] > 0 and w["median_cpu_ms_per_image"] > 0 and w["bytes_per_image"] > 0
    assert data["ratio_ours_over_ffcv"] > 0


def test_one_command_table(capsys):
    from training.cli import main as rn50

    assert rn50(["bench", "nope"]) == 2
    assert "unknown bench kind 'nope'" in capsys.readouterr().err
    assert rn50(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert rn50(["bench"]) == 0 and "bench keepup" in capsys.readouterr().out
    assert rn50([]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("bench step", "train", "show-batch", "doctor"))


def test_every_benchmark_tool_is_in_the_command_table():
    """Each benchmarks module with a main() is reachable as an rn50 command (the shared pieces have none)."""
    import ast

    from conftest import REPO

    from training.cli import COMMANDS

    listed = {module for module, _ in COMMANDS.values()}
    tools = {
        f"benchmarks.{path.stem}"
        for path in (REPO / "benchmarks").glob("*.py")
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)
    }
    assert tools and tools <= listed, sorted(tools - listed)


def test_no_import_circle_in_benchmarks():
    """Every import between benchmarks modules, at the top or inside a function, forms no cycle."""
    import ast

    from conftest import REPO

    graph = {}
    for path in (REPO / "benchmarks").glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges |= {n.split(".")[1] for n in names if n.startswith("benchmarks.") and n.count(".") >= 1}
        graph[path.stem] = edges & {p.stem for p in (REPO / "benchmarks").glob("*.py")}

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [*seen, nxt]
            if nxt not in seen:
                found = cycle_from(start, nxt, [*seen, nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, cycles[0]


def test_doctor_without_gpu_says_so(tmp_path, capsys, coded_betons):
    import torch

    from benchmarks.doctor import main

    out = tmp_path / "doctor.json"
    assert main(["--data-dir", str(coded_betons), "--workers", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    if not torch.cuda.is_available():
        assert "GPU      none found" in text and "GPU step skipped: no GPU" in text
        assert any("no GPU" in r for r in data["recommendations"])
    assert "train.beton" in text and "probe    loader ffcv" in text
    assert data["probes"]["loader"]["images_per_s"] > 0
    assert any("fit in RAM" in r for r in data["recommendations"])


def test_doctor_image_folder_and_errors(tmp_path, capsys, coded_root):
    from benchmarks.doctor import main

    assert main(["--data-dir", str(coded_root), "--no-probe"]) == 0
    text = capsys.readouterr().out
    assert "train/ 4 classes, ~48 images" in text
    assert main(["--data-dir", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_recommendations_follow_memory():
    from benchmarks.doctor import GIB, recommend

    info = {"cores": 16, "gpu": {"count": 2}, "memory": {"total_gib": 64.0}}
    small = {"betons": {"train": 10 * GIB}, "folders": {}, "disk_free_gib": 100}
    big = {"betons": {"train": 300 * GIB}, "folders": {}, "disk_free_gib": 100}
    assert any("--workers 8 per GPU" in r for r in recommend(info, small, {}))
    assert any("keep the page cache on" in r for r in recommend(info, small, {}))
    assert any("--no-os-cache --loader-order quasi_random" in r for r in recommend(info, big, {}))


def test_gpu_check_script_is_valid_bash():
    import subprocess

    from conftest import REPO

    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")]).returncode == 0


def test_sync_check_needs_a_gpu(capsys):
    import torch

    from benchmarks.sync_check import main

    if torch.cuda.is_available():
        pytest.skip("runs for real on a GPU (scripts/gpu_check.sh)")
    assert main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["step", "loader", "keepup", "convert"])
def test_an_unwritable_results_folder_is_one_line_before_measuring(kind, tmp_path, capsys):
    from training.cli import main as rn50

    (tmp_path / "file.txt").write_text("x")
    data = ["--data-dir", str(tmp_path)] if kind in ("keepup", "convert") else []
    assert rn50(["bench", kind, *data, "--out", str(tmp_path / "file.txt" / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"rn50 bench {kind}: error: --out") and "\n" not in err
