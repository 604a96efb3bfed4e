"""The answer per EC2 instance (benchmarks.instances, `rn50 doctor --instance`): which figure is used, how it is
labelled (measured / published / derived / estimate) and sourced, and the verdict -- from made-up files, so nothing
here depends on how fast this machine is."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks import instances as inst

GPU_REF = (
    Path("benchmarks/reference/nvidia-h100-80gb-hbm3_2030-01-02.json"),
    {
        "gpu": {"name": "NVIDIA H100 80GB HBM3"},
        "cpu": {"model": "Some Xeon", "cores": 16},
        "keepup": [
            {
                "backend": "ffcv",
                "source": "beton",
                "res": 160,
                "compiled": True,
                "loader_alone_images_per_s": 8000.0,
                "end_to_end_images_per_s": 6000.0,
                "step_alone_images_per_s": 9000.0,
            }
        ],
        "loader_cores": {
            "rows": [
                {"backend": "ffcv", "source": "beton", "res": 160, "cores": 8, "images_per_s": 4400.0},
                {"backend": "dali", "source": "beton", "res": 160, "cores": 8, "images_per_s": 20000.0},
            ]
        },
    },
)
CPU_RECORD = (
    Path("benchmarks/cpu/cpu-some-epyc-2cores_2030-01-02.json"),
    {
        "gpu": None,
        "cpu": {"model": "Some EPYC", "cores": 2},
        "loader_cores": {
            "rows": [
                {"backend": "ffcv", "source": "beton", "res": r, "cores": n, "images_per_s": 100.0 * n}
                for r in (160, 224)
                for n in (1, 2)
            ]
        },
    },
)


def test_the_instances_are_the_recipes_with_their_published_shapes():
    shapes = {n: (i.vcpus, i.gpus, inst.GPUS[i.gpu].name) for n, i in inst.INSTANCES.items()}
    assert shapes == {
        "p4d.24xlarge": (96, 8, "A100 40GB"),
        "p5.48xlarge": (192, 8, "H100 80GB"),
        "g5.12xlarge": (48, 4, "A10G"),
        "p3.8xlarge": (32, 4, "V100 16GB"),
        "g4dn.2xlarge": (8, 1, "T4"),
    }
    assert [g for g, spec in inst.GPUS.items() if spec.hw_jpeg] == ["A100", "H100"]


def test_the_loader_rate_is_measured_at_the_count_or_scaled_from_the_nearest_as_an_estimate():
    rates = inst.loader_rates([GPU_REF], [CPU_RECORD], 160)
    assert sorted((r.cores, r.low) for r in rates) == [(1, 100.0), (2, 200.0), (8, 4400.0), (16, 8000.0)]
    exact, _ = inst.loader_at(8, rates)
    assert (exact.kind, exact.low) == ("measured", 4400.0) and "Some Xeon" in exact.source
    scaled, base = inst.loader_at(12, rates)  # 8 and 16 are equally near: the larger count
    assert base.cores == 16 and scaled.kind == "estimate" and scaled.low == pytest.approx(6000.0)
    assert "x 12/16, linear in CPUs: an estimate" in scaled.source
    low, base = inst.loader_at(4, inst.loader_rates([], [CPU_RECORD], 224))
    assert base.cores == 2 and low.low == pytest.approx(400.0) and "Some EPYC" in low.source
    assert inst.loader_at(8, []) is None


def test_the_gpu_rate_is_measured_then_published_then_an_estimate_by_pixel_count():
    h100 = inst.GPUS["H100"]
    measured = inst.gpu_rate(h100, 160, [GPU_REF])
    assert (measured.kind, measured.low) == ("measured", 9000.0) and "nvidia-h100" in measured.source
    assert inst.gpu_rate(h100, 224, [GPU_REF]).kind == "published"  # nothing measured at 224
    est = inst.gpu_rate(inst.GPUS["V100"], 160, [])
    assert est.kind == "estimate" and est.low == pytest.approx(1200 * (224 / 160) ** 2)
    assert "(224/160)^2" in est.source and "an estimate" in est.source
    assert inst.gpu_rate(inst.GPUS["A10G"], 224, []) is None


def test_the_verdict_says_by_how_much_and_what_to_do():
    t4, a100 = inst.GPUS["T4"], inst.GPUS["A100"]
    fig = lambda v, kind="measured": inst.Figure(v, v, kind, "s")  # noqa: E731
    assert inst.verdict(fig(1000), fig(500), t4) == "keeps up: 2.0x"
    short = inst.verdict(fig(750), fig(1000, "published"), a100)
    assert short.startswith("falls short by 25% (estimate)") and "hardware decoder" in short
    assert "nvJPEG on the SMs (competes with the step)" in inst.verdict(fig(750), fig(1000), t4)
    assert inst.verdict(None, fig(1000), t4) == "unknown: no loader rate at this resolution"
    assert inst.verdict(fig(1), None, inst.GPUS["A10G"]) == "unknown: no training rate for the A10G"


def test_every_figure_in_the_table_has_its_kind_and_a_source_in_the_legend():
    text = inst.table(list(inst.INSTANCES), [GPU_REF], [CPU_RECORD])
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5 * 3
    cited = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for cell in cells[4:6]:
            if cell not in ("no published figure", "not measured"):
                m = re.fullmatch(r"(≈?)[\d,–]+ \((measured|published|derived|estimate)(, [^\[]+)? \[(\d+)\]\)", cell)
                assert m, cell
                assert (m.group(1) == "≈") == (m.group(2) == "estimate"), cell  # an estimate is marked as one
                if cell == cells[5]:  # a loader rate names the CPUs and the CPU model it was measured on
                    assert re.fullmatch(r", (from )?\d+ CPUs of Some (Xeon|EPYC)", m.group(3)), cell
                elif m.group(2) == "estimate":  # a GPU rate scaled by pixel count names the resolution it came from
                    assert re.fullmatch(r", from \d+ px", m.group(3)), cell
                cited.add(int(m.group(4)))
    legend = [line for line in text.splitlines() if re.match(r"- \[\d+\] ", line)]
    assert cited == set(range(1, len(legend) + 1))
    g4dn = {r.split("|")[4].strip(): r for r in rows if r.startswith("| g4dn.2xlarge")}
    assert "| 4,400 (measured, 8 CPUs of Some Xeon [" in g4dn["160"]  # measured at its 8 vCPUs (on the GPU machine)
    assert (
        "| ≈800 (estimate, from 2 CPUs of Some EPYC [" in g4dn["224"]
    )  # 200 img/s measured at 2 CPUs x 8/2: the nearest count, scaled
    assert "generated `rn50 synth` images" in text and "not sufficient" in text


def test_doctor_instance_prints_the_answer_or_one_line(capsys):
    from benchmarks.doctor import main

    assert main(["--instance", "g4dn.2xlarge"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("g4dn.2xlarge: 8 vCPUs, 1x T4") and "| g4dn.2xlarge | 1x T4 | 8/1 = 8 | 224 |" in out
    assert "Sources:" in out and "p4d.24xlarge" not in out
    assert main(["--instance", "p9.huge"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rn50 doctor: error: --instance p9.huge: not one of") and "\n" not in err
