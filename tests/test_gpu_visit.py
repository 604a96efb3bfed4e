"""What a GPU visit relies on, checked on the CPU: every part writes what it measured as it goes, a failing or missing
path costs its own row and nothing else, a failure arrives with its cause, the results land in $OUT (at most 8 files),
and a CUDA graph capture that fails falls back to the compiled step with one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, requires_dali, requires_ffcv

from benchmarks import gpu_proof, gpu_smoke, step_bench, sync_check
from training.engine import train_step


def dali_error() -> RuntimeError:
    """DALI's shape of an execution-time error: a generic message, the real cause chained behind it."""
    try:
        try:
            raise RuntimeError("The cropping window [0, 0, 90, 90] is not valid for image dimensions [64 x 80]")
        except RuntimeError as cause:
            raise RuntimeError("Current pipeline object is no longer valid.") from cause
    except RuntimeError as e:
        return e


# ---------------------------------------------------------------------------------------------------- gpu_proof


@pytest.fixture(scope="module")
def proof_data(coded_root, coded_betons_jpeg, tmp_path_factory) -> Path:
    from benchmarks.bench_data import repeat_beton, repeat_folders

    data = tmp_path_factory.mktemp("proof_data")
    (data / "betons").mkdir()
    repeat_beton(coded_betons_jpeg / "train.beton", data / "betons" / "train.beton", 2)
    shutil.copy(coded_betons_jpeg / "classes.json", data / "betons" / "classes.json")
    repeat_folders(coded_root / "train", data / "folders" / "train", 2)
    (data / "dataset.json").write_text(json.dumps({"description": "coded images repeated twice"}))
    return data


def proof_args(data: Path, out: Path, paths: str, res: str = "32") -> list[str]:
    return [
        *("--data", str(data), "--res", res, "--batch-size", "4", "--window", "2", "--warmup", "1"),
        *("--step-warmup", "1", "--arch", "resnet18", "--precision", "fp32", "--no-compile", "--device", "cpu"),
        *("--workers", "1", "--paths", paths, "--sweeps", "", "--out-dir", str(out / "ref")),
        *("--json", str(out / "gpu_proof.json"), "--copy-to", str(out / "copy")),
    ]


def failing_build(monkeypatch, fail: dict[str, BaseException]) -> None:
    real = gpu_proof.build

    def build(path, *args, **kw):
        if path in fail:
            raise fail[path]
        return real(path, *args, **kw)

    monkeypatch.setattr(gpu_proof, "build", build)


@requires_dali
@requires_ffcv
def test_a_failing_or_missing_loader_path_costs_its_own_row_only(proof_data, tmp_path, monkeypatch, capsys):
    """dali-folder fails inside DALI, ffcv is not installed: the dali-beton row is written, both others are named with
    their causes (DALI's own message kept), and the full traceback is printed."""
    failing_build(monkeypatch, {"dali-folder": dali_error(), "ffcv": ModuleNotFoundError("No module named 'ffcv'")})
    assert gpu_proof.main(proof_args(proof_data, tmp_path, "dali-folder,dali-beton,ffcv")) == 0
    err = capsys.readouterr().err
    assert "Traceback" in err and "cropping window" in err and "No module named 'ffcv'" in err
    (ref,) = (tmp_path / "ref").glob("cpu_*.json")
    data = json.loads(ref.read_text())
    assert [(r["backend"], r["source"]) for r in data["keepup"]] == [("dali", "beton")]
    folder, ffcv = data["skipped"]
    assert folder.startswith("dali-folder at 32 px") and "cropping window" in folder and "no longer valid" in folder
    assert ffcv.startswith("ffcv at 32 px") and "ModuleNotFoundError" in ffcv
    record = json.loads((tmp_path / "gpu_proof.json").read_text())
    assert record["skipped"] == data["skipped"] and len(record["keepup"]) == 1 and record["step_alone"]
    assert (tmp_path / "copy" / ref.name).read_text() == ref.read_text()  # the copy for $OUT follows the file


@requires_dali
def test_the_rows_measured_before_a_kill_are_on_disk(proof_data, tmp_path, monkeypatch):
    """A part killed after its first row (here: an interrupt while the second path starts) leaves that row in the
    reference file, its copy and the JSON record."""
    failing_build(monkeypatch, {"dali-folder": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        gpu_proof.main(proof_args(proof_data, tmp_path, "dali-beton,dali-folder"))
    (ref,) = (tmp_path / "ref").glob("cpu_*.json")
    assert [r["source"] for r in json.loads(ref.read_text())["keepup"]] == ["beton"]
    assert (tmp_path / "copy" / ref.name).is_file()
    assert len(json.loads((tmp_path / "gpu_proof.json").read_text())["keepup"]) == 1


@requires_dali
def test_a_step_that_fails_at_one_resolution_keeps_the_next(proof_data, tmp_path, monkeypatch, capsys):
    real = gpu_proof.step_alone

    def step_alone(parts, device, batch_size, res, *args):
        if res == 32:
            raise RuntimeError("inductor: compilation failed")
        return real(parts, device, batch_size, res, *args)

    monkeypatch.setattr(gpu_proof, "step_alone", step_alone)
    assert gpu_proof.main(proof_args(proof_data, tmp_path, "dali-beton", res="32,40")) == 0
    (ref,) = (tmp_path / "ref").glob("cpu_*.json")
    data = json.loads(ref.read_text())
    assert [r["res"] for r in data["keepup"]] == [40]
    assert data["skipped"][0].startswith("the eager step at 32 px") and "compilation failed" in data["skipped"][0]
    assert "inductor: compilation failed" in capsys.readouterr().err


def test_nothing_measured_is_a_message_and_exit_1_not_a_traceback(proof_data, tmp_path, capsys):
    """The budget spent before the proof starts (clock started long ago): everything is skipped and named."""
    args = proof_args(proof_data, tmp_path, "dali-beton") + ["--started-at", "0", "--budget-s", "60"]
    assert gpu_proof.main(args) == 1
    out = capsys.readouterr()
    assert "skipped 32 px" in out.out and "no keep-up row was measured" in out.err
    assert json.loads((tmp_path / "gpu_proof.json").read_text())["skipped"] == ["32 px (budget)"]
    assert not (tmp_path / "ref").exists()


# ---------------------------------------------------------------------------------------------------- bench step


def test_a_failing_lever_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    def measure(arch, res, batch_size, *args, lever):
        if lever.name == "graphs":
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        if lever.name == "bs384":
            raise KeyboardInterrupt  # a kill after two rows
        return {"lever": lever.name, "res": res, "batch_size": batch_size, "mode": lever.mode, "sgd": lever.sgd}

    def fake_measure(*args, lever=None, **kw):
        row = measure(*args, lever=lever)
        row.update(precision="fp32", input="3 channels", device="cpu", images_per_s=10.0, compile_s=1.0)
        return {**row, "peak_memory_gib": None, "windows_images_per_s": [10.0]}

    monkeypatch.setattr(step_bench, "measure_step", fake_measure)
    out = tmp_path / "step"
    assert step_bench.main(["--levers", "eager,graphs,compile", "--res", "32", "--out", str(out)]) == 1
    data = json.loads((out / "step.json").read_text())
    assert [r["lever"] for r in data["results"]] == ["eager", "compile"]
    assert len(data["failed"]) == 1 and "lever graphs at 32 px" in data["failed"][0]
    assert "stream is capturing" in capsys.readouterr().err
    assert data["results"][1]["compile_note"].startswith("inductor's cache warm")  # compiled after an earlier lever
    with pytest.raises(KeyboardInterrupt):
        step_bench.main(["--levers", "eager,compile,bs384", "--res", "32", "--out", str(tmp_path / "killed")])
    assert [r["lever"] for r in json.loads((tmp_path / "killed" / "step.json").read_text())["results"]] == [
        "eager",
        "compile",
    ]


def test_graphs_rows_say_that_fused_sgd_is_not_in_effect(tmp_path, monkeypatch):
    def fake_measure(arch, res, batch_size, *args, lever=None, **kw):
        return {
            **dict(lever=lever.name, res=res, batch_size=batch_size, mode=lever.mode, sgd=lever.sgd),
            **dict(precision="bf16", input="3 channels", device="cpu", images_per_s=1.0, compile_s=1.0),
            **dict(peak_memory_gib=None, windows_images_per_s=[1.0]),
        }

    monkeypatch.setattr(step_bench, "measure_step", fake_measure)
    assert step_bench.main(["--levers", "best,fused", "--res", "32", "--out", str(tmp_path)]) == 0
    best, fused = json.loads((tmp_path / "step.json").read_text())["results"]
    assert best["sgd"] == "graph's own SGD (fused not in effect)" and fused["sgd"] == "fused"


# ---------------------------------------------------------------------------------------------------- sync check


def test_the_sync_check_keeps_each_result_as_it_ends(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "a test GPU")

    def check(precision, mode, *args):
        if mode == "compile":
            raise dali_error()  # any failure of the warm-up (compilation, capture) is one result, not the end
        return {"precision": precision, "requested": mode, "mode": mode, "sgd": "fused", "synchronisations": 0}

    monkeypatch.setattr(sync_check, "check", check)
    out = tmp_path / "sync.json"
    assert sync_check.main(["--precision", "bf16", "--steps", "eager,compile,graphs", "--json", str(out)]) == 1
    data = json.loads(out.read_text())
    assert [r["requested"] for r in data["results"]] == ["eager", "compile", "graphs"]
    assert data["results"][1]["synchronisations"] is None and "cropping window" in data["results"][1]["failed"]
    assert "event waits" in data["covers"]  # what "no host sync" does not cover is in the file
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- smoke


@requires_dali
@requires_ffcv
def test_the_smoke_harness_on_the_cpu_records_each_check(tmp_path):
    """The loader checks with --device cpu (DALI's CPU pipeline against itself in float32): the data, three batches
    checked, the first compared with the reference; smoke.log and smoke.json hold each check."""
    out = tmp_path / "out"
    rc = gpu_smoke.main(
        ["--out", str(out), "--data", str(tmp_path / "d"), "--device", "cpu", "--checks", "data,dali-beton"]
    )
    assert rc == 0
    checks = json.loads((out / "smoke.json").read_text())["checks"]
    assert [(c["check"], c["status"]) for c in checks] == [("data", "PASS"), ("dali-beton", "PASS")]
    details = checks[1]["details"]
    assert details["builds"] == 1 and 0 <= details["mean_abs_pixel_diff"] <= gpu_smoke.PIXEL_TOLERANCE
    assert "==== dali-beton       PASS" in (out / "smoke.log").read_text()


def test_a_failing_check_records_its_traceback_and_cause(tmp_path, monkeypatch):
    def broken(data, device):
        raise dali_error()

    monkeypatch.setitem(gpu_smoke.FUNCTIONS, "env", broken)
    result = tmp_path / "r.json"
    assert gpu_smoke.run_child("env", tmp_path, "cpu", result, timeout=60) == 1
    payload = json.loads(result.read_text())
    assert payload["status"] == "FAIL"
    assert payload["summary"] == (
        "RuntimeError: Current pipeline object is no longer valid. <- RuntimeError: The cropping window "
        "[0, 0, 90, 90] is not valid for image dimensions [64 x 80]"
    )
    assert "Traceback" in payload["error"] and "direct cause" in payload["error"]


def test_a_hung_check_times_out_with_its_stack_and_the_next_one_runs(tmp_path, monkeypatch):
    (tmp_path / "hangmod.py").write_text("import time\n\ndef hang(data, device):\n    time.sleep(600)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{REPO}")
    monkeypatch.chdir(REPO)
    out = tmp_path / "out"
    rc = gpu_smoke.main(["--out", str(out), "--device", "cpu", "--checks", "hangmod:hang,env", "--timeout", "8"])
    assert rc == 1
    hang, env = json.loads((out / "smoke.json").read_text())["checks"]
    assert hang["status"] == "TIMEOUT" and env["status"] == "PASS"
    assert "most recent call first" in hang["output"] and "hangmod.py" in hang["output"]  # faulthandler's stacks
    assert "---- output" in (out / "smoke.log").read_text()


def test_a_missing_package_is_a_named_skip(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_smoke, "probe", lambda need: need != "dali")
    out = tmp_path / "out"
    assert gpu_smoke.main(["--out", str(out), "--data", str(tmp_path / "none"), "--checks", "dali-beton,ffcv"]) == 0
    beton, ffcv = json.loads((out / "smoke.json").read_text())["checks"]
    assert beton["status"] == ffcv["status"] == "SKIP"
    assert beton["summary"] == "needs DALI (nvidia.dali), the data check" and ffcv["summary"] == "needs the data check"


# ---------------------------------------------------------------------------------------------------- the script


def run_script(tmp_path: Path, **env) -> tuple[int, list[str], str]:
    out = tmp_path / "out"
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=full, capture_output=True, text=True)
    return proc.returncode, sorted(p.name for p in out.iterdir()), proc.stdout + proc.stderr


def test_gpu_check_writes_to_OUT_and_keeps_its_data_elsewhere(tmp_path):
    rc, files, text = run_script(tmp_path, PART="smoke", SMOKE_CHECKS="env", SMOKE_ARGS="--device cpu")
    assert rc == 0, text
    assert files == ["gpu_check.log", "smoke.json", "smoke.log"]
    assert "gpu_check (smoke)" in (tmp_path / "out" / "gpu_check.log").read_text()


@pytest.mark.slow  # makes a tiny benchmark dataset (synth + two conversions) and runs the proof on the CPU (~1 min)
@requires_dali
@requires_ffcv
def test_the_loaders_part_lands_at_most_8_files_in_OUT(tmp_path):
    data = tmp_path / "data"
    rc, files, text = run_script(
        tmp_path,
        DATA=str(data),
        **dict(UNIQUE="100", SAMPLES="200", WORKERS="2", RES="32", BS="8", SYNC_CHECK="0"),
        SMOKE_CHECKS="data",
        SMOKE_ARGS=f"--device cpu --data {tmp_path / 'smoke'}",
        PROOF_ARGS=f"--device cpu --out-dir {tmp_path / 'ref'} --window 2 --warmup 1 --step-warmup 1 --no-compile "
        "--arch resnet18 --precision fp32 --paths dali-beton --sweeps mixed",
    )
    assert rc == 0, text
    assert len(files) <= 8 and files == sorted(
        ["gpu_check.log", "smoke.json", "smoke.log", "dataset.json", "gpu_proof.json", files[0]]
    ), files
    assert files[0].startswith("cpu_") and (tmp_path / "ref" / files[0]).is_file()  # the file this run wrote
    assert (data / "betons" / "train.beton").is_file() and (data / "dataset.json").is_file()  # data outside OUT
    extras = json.loads((tmp_path / "out" / "gpu_proof.json").read_text())["extras"]
    assert "half-raw beton" in extras[0]["what"]


@pytest.mark.slow  # makes a tiny benchmark dataset and runs the loader in a confined process per count (~1 min)
@requires_ffcv
def test_the_cores_part_measures_each_count_and_lands_at_most_8_files_in_OUT(tmp_path):
    """PART=cores on the CPU (a CPU record instead of the GPU's reference file): one row per backend, resolution and
    count, the kept file copied to $OUT, the data outside it."""
    counts = "1,2" if len(os.sched_getaffinity(0)) >= 2 else "1"
    rc, files, text = run_script(
        tmp_path,
        PART="cores",
        DATA=str(tmp_path / "data"),
        **dict(UNIQUE="100", SAMPLES="200", WORKERS="2", BS="8", CORES=counts, CORES_RES="32"),
        **dict(CORES_BACKENDS="ffcv", CORES_BATCHES="2", CORES_ARGS="--device cpu"),
        CORES_KEEP=f"--record {tmp_path / 'cpu'}",
    )
    assert rc == 0, text
    everything = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    kept = [f for f in files if f.startswith("cpu-")]
    assert len(everything) <= 8 and kept and (tmp_path / "cpu" / kept[0]).is_file(), everything
    assert {"gpu_check.log", "dataset.json", "cores/loader.json", "cores/loader.md"} <= set(everything)
    rows = json.loads((tmp_path / "out" / kept[0]).read_text())["loader_cores"]["rows"]
    assert sorted(r["cores"] for r in rows) == [int(n) for n in counts.split(",")]
    assert "gpu_check (cores)" in (tmp_path / "out" / "gpu_check.log").read_text()


# ---------------------------------------------------------------------------------------------------- DALI's cause


@requires_dali
def test_a_dali_failure_keeps_dalis_own_message(coded_betons_jpeg, monkeypatch):
    from pipeline import LoaderOptions, Placement, build_loader
    from pipeline.contract import SampleError

    loader = build_loader(
        coded_betons_jpeg,
        "train",
        batch_size=4,
        resolution=32,
        placement=Placement("cpu"),
        options=LoaderOptions("dali"),
        verbose=False,
    )
    feeder = loader._feeder

    class FailingPipeline:
        def schedule_run(self):
            feeder(None)  # the callback queues the batch, as DALI would

        def share_outputs(self, *args):
            raise dali_error()

    monkeypatch.setattr(loader, "_pipeline", lambda: FailingPipeline())
    with pytest.raises(SampleError, match="cropping window .* is not valid for image dimensions"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------------- graph fallback


def test_a_failed_capture_falls_back_to_the_compiled_step_from_the_same_state(monkeypatch, capsys):
    """The capture fails after its warm-up steps changed the weights (torch.cuda.graph raises; the CUDA calls around
    it are stand-ins on the CPU): the warm-up is undone, one line says why, the graph is dropped, and the run continues
    exactly as the plain step would have, bit for bit."""
    import copy
    from contextlib import nullcontext

    from test_step import CPU, batches, parts_for

    from training.model import build_model

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    def no_capture(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", no_capture)
    torch.manual_seed(4)
    model = build_model("resnet18", 4, channels_last=True)
    plain_model = copy.deepcopy(model)
    from training.schedules import Schedule

    schedule = Schedule(kind="onecycle", max_lr=0.05, steps_per_epoch=3, epochs=1, cycle_momentum=True)
    plain = parts_for(plain_model, schedule)
    graphed = parts_for(model, schedule, graphed=True)
    graphed.graphed.capture = True  # as on a GPU: warm-up on a side stream, then the capture (which fails)
    for step, batch in enumerate(batches(32, 3, seed=6)):
        a = train_step(plain, [batch], step, CPU)
        b = train_step(graphed, [batch], step, CPU)
        assert torch.equal(b[0], a[0]) and torch.equal(b[1], a[1]), step
    for x, y in zip(model.state_dict().values(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    assert graphed.graphed is None and graphed.step_mode == "compile"
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines == [
        "rn50: --step graphs: the CUDA graph capture failed (RuntimeError: CUDA error: operation not permitted when "
        "stream is capturing): compiled step instead"
    ]
