"""The GPU proof's pieces on the CPU: the repeated benchmark dataset, the proof run itself (tiny, no GPU), the
reference files' schema, and the README tables that must agree with the committed reference files."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from conftest import REPO, requires_dali, requires_ffcv

from benchmarks import reference

pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning")

FIXTURE = {
    "format": 1,
    "date": "2030-01-02",
    "gpu": {"name": "NVIDIA H200", "memory_gib": 139.8, "count": 1, "capability": "9.0", "cuda": "13.0"},
    "cpu": {"model": "Some Xeon", "cores": 16, "ram_gib": 126.0},
    "versions": {"torch": "2.11.0", "dali": "2.4.0", "ffcv": "1.0.2"},
    "dataset": {"description": "2,000 distinct rn50 synth images each repeated 28x: 56,000 train samples"},
    "settings": {
        "arch": "resnet50",
        "batch_size": 256,
        "precision": "bf16",
        "window_batches": 200,
        "warmup_batches": 10,
    },
    "keepup": [
        {
            "backend": "dali",
            "source": "beton",
            "res": 160,
            "compiled": True,
            "loader_alone_images_per_s": 25000.0,
            "end_to_end_images_per_s": 11800.0,
            "step_alone_images_per_s": 12000.0,
            "ratio": 0.9833,
            "data_wait_share": 0.01,
            "process_cores": 3.2,
        },
        {
            "backend": "ffcv",
            "source": "beton",
            "res": 160,
            "compiled": True,
            "end_to_end_images_per_s": 7000.0,
            "step_alone_images_per_s": 12000.0,
            "ratio": 0.5833,
        },
    ],
    "sweeps": {
        "hw_decoder_load": [
            {"value": 0.0, "images_per_s": 15000.0, "process_cores": 6.0},
            {"value": 0.99, "images_per_s": 26000.0, "process_cores": 2.5},
        ]
    },
}


def test_tables_come_from_the_files(tmp_path):
    (tmp_path / "nvidia-h200_2030-01-02.json").write_text(json.dumps(FIXTURE))
    text = reference.render(tmp_path)
    assert "#### NVIDIA H200, 16 CPU cores, 2030-01-02 (`benchmarks/reference/nvidia-h200_2030-01-02.json`)" in text
    assert "| dali | beton | 160 | compiled | 25,000 | 11,800 | 12,000 | 0.98 | 1% | 3.20 |" in text
    assert "| ffcv | beton | 160 | compiled | - | 7,000 | 12,000 | 0.58 | - | - |" in text
    assert "Sweep of hw_decoder_load" in text and "| 0.99 | 26,000 | 2.50 |" in text
    assert "torch 2.11.0, dali 2.4.0, ffcv 1.0.2" in text
    assert reference.render(tmp_path / "none") == reference.NOTHING_YET


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: d.pop("dataset"), "keepup rows without dataset"),
        (lambda d: (d.pop("keepup"), d.pop("step", None)), "neither keepup nor step rows"),
        (
            lambda d: d.update(step=[{"res": 224, "batch_size": 256, "precision": "bf16", "mode": "graphs"}]),
            "step row 0 lacks images_per_s, compile_s",
        ),
        (lambda d: d.update(gpu=None), "needs gpu.name"),
        (lambda d: d["keepup"][0].pop("source"), "row 0 lacks source"),
        (lambda d: d["keepup"][1].update(source="disk"), "source must be one of"),
        (lambda d: d["keepup"][0].update(ratio=0.5), "is not end to end / step alone"),
    ],
)
def test_a_file_without_what_the_tables_need_is_refused(tmp_path, damage, message):
    data = copy.deepcopy(FIXTURE)
    damage(data)
    (tmp_path / "x.json").write_text(json.dumps(data))
    with pytest.raises(reference.ReferenceError, match=message):
        reference.render(tmp_path)


def test_write_then_check_and_a_stale_readme_fails(tmp_path, capsys):
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "nvidia-h200_2030-01-02.json").write_text(json.dumps(FIXTURE))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{reference.BEGIN}\nold tables\n{reference.END}\nafter\n")
    assert reference.main(["--dir", str(refs), "--check", str(readme)]) == 1
    assert "differ" in capsys.readouterr().err
    assert reference.main(["--dir", str(refs), "--write", str(readme)]) == 0
    assert reference.main(["--dir", str(refs), "--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith(f"{reference.END}\nafter\n") and "11,800" in text
    data = copy.deepcopy(FIXTURE)
    data["keepup"][0].update(end_to_end_images_per_s=11000.0, ratio=0.9167)  # a new measurement ...
    (refs / "nvidia-h200_2030-01-02.json").write_text(json.dumps(data))
    assert reference.main(["--dir", str(refs), "--check", str(readme)]) == 1  # ... makes the README stale
    readme.write_text("no markers\n")
    assert reference.main(["--dir", str(refs), "--check", str(readme)]) == 2


def test_the_readme_tables_match_the_committed_reference_files():
    """Fails when a reference file or CPU record is added or changed without regenerating the README (or the README's
    tables are edited by hand): rn50 bench reference --write README.md."""
    assert reference.main(["--check", str(REPO / "README.md")]) == 0
    text = (REPO / "README.md").read_text()
    assert reference.INSTANCE_BEGIN in text and reference.INSTANCE_END in text  # the per-instance table is there


def test_the_instance_table_comes_from_both_folders(tmp_path, capsys):
    """A README with the per-instance markers gets the table and each CPU record's rows; a new CPU record makes it
    stale."""
    refs, cpu = tmp_path / "refs", tmp_path / "cpu"
    refs.mkdir()
    cpu.mkdir()
    (refs / "nvidia-h200_2030-01-02.json").write_text(json.dumps(FIXTURE))
    readme = tmp_path / "README.md"
    readme.write_text(
        f"{reference.BEGIN}\n{reference.END}\n\n{reference.INSTANCE_BEGIN}\nold\n{reference.INSTANCE_END}\n"
    )
    dirs = ["--dir", str(refs), "--cpu-dir", str(cpu)]
    assert reference.main([*dirs, "--write", str(readme)]) == 0
    assert "| g4dn.2xlarge | 1x T4 | 8/1 = 8 | 224 |" in readme.read_text()
    record = {k: FIXTURE[k] for k in ("format", "date", "versions")}
    record.update(gpu=None, cpu={"model": "Some EPYC", "cores": 2})
    record["loader_cores"] = {
        "settings": {"batch_size": 256},
        "rows": [{"backend": "ffcv", "source": "beton", "res": 224, "cores": 2, "images_per_s": 500.0}],
    }
    (cpu / "cpu-some-epyc-2cores_2030-01-02.json").write_text(json.dumps(record))
    assert reference.main([*dirs, "--check", str(readme)]) == 1 and "differ" in capsys.readouterr().err
    assert reference.main([*dirs, "--write", str(readme)]) == 0
    text = readme.read_text()
    assert "#### Some EPYC, 2 logical CPUs, no GPU, 2030-01-02 (`benchmarks/cpu/cpu-some-epyc-2cores" in text
    assert "≈2,000 (estimate, from 2 CPUs of Some EPYC [" in text  # g4dn at 224: 500 x 8/2


@requires_ffcv
def test_repeat_beton_copies_every_sample(coded_betons, tmp_path):
    from benchmarks.bench_data import bytes_per_image, repeat_beton
    from dataset_tools.inspect_beton import decode_sample, open_beton

    src = coded_betons / "train.beton"
    n = open_beton(src).num_samples
    assert repeat_beton(src, tmp_path / "train.beton", 3) == 3 * n
    a, b = open_beton(src), open_beton(tmp_path / "train.beton")
    assert b.num_samples == 3 * n and b.page_size == a.page_size
    page = a.page_size
    for k in range(3):  # every copy keeps its samples' offsets within their pages (FFCV reads whole pages)
        rows = b.alloc_table[k * len(a.alloc_table) : (k + 1) * len(a.alloc_table)]
        assert np.array_equal(rows["ptr"] % page, a.alloc_table["ptr"] % page)
        assert np.array_equal(rows["sample_id"], a.alloc_table["sample_id"] + k * n)
    for i in (0, n - 1):
        original = decode_sample(a, i)
        for k in range(3):
            copy_k = decode_sample(b, i + k * n)
            assert np.array_equal(copy_k[0], original[0]) and copy_k[1] == original[1]
    facts = bytes_per_image(tmp_path / "train.beton")
    assert facts["samples"] == 3 * n and 0 < facts["raw"] < 3 * n


@requires_dali
@requires_ffcv
def test_gpu_proof_runs_on_the_cpu_and_writes_a_reference_shaped_file(coded_root, coded_betons_jpeg, tmp_path, capsys):
    """The proof's whole path, tiny and on the CPU: timing numbers mean nothing here, the file's shape does."""
    from benchmarks import gpu_proof
    from benchmarks.bench_data import repeat_beton, repeat_folders

    data = tmp_path / "data"
    (data / "betons").mkdir(parents=True)
    repeat_beton(coded_betons_jpeg / "train.beton", data / "betons" / "train.beton", 2)
    shutil.copy(coded_betons_jpeg / "classes.json", data / "betons" / "classes.json")
    repeat_folders(coded_root / "train", data / "folders" / "train", 2)
    (data / "dataset.json").write_text(json.dumps({"description": "coded images repeated twice"}))
    args = [
        "--data",
        str(data),
        "--res",
        "32",
        "--batch-size",
        "4",
        "--window",
        "3",
        "--warmup",
        "1",
        "--step-warmup",
        "1",
        "--arch",
        "resnet18",
        "--precision",
        "fp32",
        "--no-compile",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--paths",
        "dali-beton,dali-folder",
        "--sweeps",
        "hw_decoder_load",
    ]
    assert gpu_proof.main(args[:-4]) == 2 and "no CUDA device" in capsys.readouterr().err  # no --out-dir
    assert gpu_proof.main(args + ["--out-dir", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("cpu_*.json")
    result = reference.validate(json.loads(written.read_text()), str(written), need_gpu=False)
    assert [(r["backend"], r["source"], r["res"], r["compiled"]) for r in result["keepup"]] == [
        ("dali", "beton", 32, False),
        ("dali", "folder", 32, False),
    ]
    for r in result["keepup"]:
        assert (
            r["loader_alone_images_per_s"] > 0 and r["end_to_end_images_per_s"] > 0 and "hw_decoder_load" in r["knobs"]
        )
    assert [s["value"] for s in result["sweeps"]["hw_decoder_load"]] == [0.0, 0.65, 0.9, 0.99]
    assert result["settings"]["window_batches"] == 3 and result["skipped"] == []


STEP_ROWS = [
    {
        "lever": "compile",
        "res": 224,
        "batch_size": 256,
        "precision": "bf16",
        "mode": "compile",
        "sgd": "foreach",
        "images_per_s": 6800.0,
        "vs_compile": 1.0,
        "compile_s": 71.2,
    },
    {
        "lever": "graphs",
        "res": 224,
        "batch_size": 256,
        "precision": "bf16",
        "mode": "graphs",
        "sgd": "foreach",
        "images_per_s": 7400.0,
        "vs_compile": 1.088,
        "compile_s": 80.0,
    },
]


def test_step_rows_and_keepup_rows_share_the_days_file(tmp_path, monkeypatch):
    """rn50 bench step --reference and the GPU proof write one file per GPU and day, each replacing only its part;
    the tables show both."""
    info = {
        "gpu": FIXTURE["gpu"],
        "cpu": "Some Xeon",
        "cores": 16,
        "ram_gib": 126.0,
        "versions": FIXTURE["versions"],
        "python": "3.12",
    }
    step_path = reference.save(info, tmp_path, driver="580.1", step=STEP_ROWS)
    keepup = {k: FIXTURE[k] for k in ("dataset", "settings", "keepup", "sweeps")}
    assert reference.save(info, tmp_path, driver="580.1", **keepup) == step_path
    data = json.loads(step_path.read_text())
    assert data["step"] == STEP_ROWS and data["keepup"] == FIXTURE["keepup"] and data["gpu"]["driver"] == "580.1"
    text = reference.render(tmp_path)
    assert "| graphs | 224 | 256 | bf16 | graphs | foreach | 7,400 | 1.09 | 80 |" in text
    assert "| dali | beton | 160 | compiled | 25,000 | 11,800 | 12,000 | 0.98 | 1% | 3.20 |" in text
    reference.save(info, tmp_path, step=STEP_ROWS[:1])  # a rerun replaces the step rows only
    again = json.loads(step_path.read_text())
    assert again["step"] == STEP_ROWS[:1] and again["keepup"] == FIXTURE["keepup"]
