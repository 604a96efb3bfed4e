"""A benchmark confined to N logical CPUs (benchmarks.cores, `rn50 bench loader --cores`): which CPUs are chosen,
that every thread and worker process is confined (their allowed CPUs, read from the kernel -- not a timing), and that
a count that cannot run costs only itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, requires_dali, requires_ffcv

from benchmarks import cores, reference

pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in.*finalize:pytest.PytestUnraisableExceptionWarning")

ALLOWED = cores.allowed_cpus()


def test_pick_cpus_takes_both_hardware_threads_of_a_core_first():
    """8 CPUs on 4 cores, siblings numbered n and n + 4 (Linux's usual numbering): 2 vCPUs are one core's two
    threads, as on EC2."""
    core = {c: (0, c % 4) for c in range(8)}.__getitem__
    assert cores.pick_cpus(2, list(range(8)), core) == [0, 4]
    assert cores.pick_cpus(3, list(range(8)), core) == [0, 1, 4]
    assert cores.pick_cpus(8, list(range(8)), core) == list(range(8))
    assert cores.smt_pairs([0, 4, 1], core) == 2
    assert cores.pick_cpus(2, [0, 1, 2, 3], lambda c: (0, c)) == [0, 1]  # no SMT: one CPU per core


def test_a_count_beyond_the_allowed_cpus_is_one_line():
    with pytest.raises(ValueError, match=r"--cores 3: this process may run on 2 logical CPUs \(0,1\); choose"):
        cores.pick_cpus(3, [0, 1])
    with pytest.raises(ValueError, match="--cores wants counts"):
        cores.parse_counts("1,x")
    assert cores.parse_counts("1, 2,4") == [1, 2, 4]


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 logical CPUs to confine to fewer")
def test_confine_reaches_threads_that_already_run_and_snapshot_sees_the_others():
    code = """
import json, os, threading, time
from benchmarks import cores
before = cores.snapshot([ALLOWED[0]])  # nothing confined yet: the main thread is allowed more
stop = threading.Event()
t = threading.Thread(target=stop.wait)
t.start()
cores.confine([ALLOWED[0]])
after = cores.snapshot([ALLOWED[0]])
stop.set(); t.join()
print(json.dumps({"before": before, "after": after, "env": os.environ["NUMBA_NUM_THREADS"]}))
""".replace("ALLOWED", repr(ALLOWED))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    result = json.loads(out)
    assert result["before"]["threads_outside"]  # the check can fail: an unconfined thread is named
    after = result["after"]
    assert after["threads"] == 2 and after["threads_outside"] == {} and result["env"] == "1"


def test_a_spent_budget_starts_no_count(capsys):
    got = []
    lost = cores.run_counts("benchmarks.loader_bench", [], [1], "loader.json", got.append, deadline=0.0)
    assert lost == ["1 cores (budget)"] and got == [] and "skipped 1 cores" in capsys.readouterr().err


@requires_ffcv
@requires_dali
def test_loader_by_cores_confines_every_thread_and_worker(coded_root, coded_betons, tmp_path):
    """`rn50 bench loader --cores 1`: the ffcv backend's decoding threads, DALI's CPU pipeline and torchvision's
    worker processes all ran on the one chosen CPU, with torch, numba, DALI and the workers at 1; --record keeps the
    rows in a CPU record that benchmarks.reference reads."""
    from training.cli import main as rn50

    args = ["bench", "loader", "--data-dir", str(coded_betons), "--image-folder", str(coded_root)]
    args += ["--backend", "ffcv,dali-beton,torchvision", "--res", "32", "--batch-size", "8", "--epochs", "2"]
    args += ["--device", "cpu", "--cores", "1", "--out", str(tmp_path / "out"), "--record", str(tmp_path / "cpu")]
    assert rn50(args) == 0
    data = json.loads((tmp_path / "out" / "loader.json").read_text())
    rows = {r["backend"]: r for r in data["rows"]}
    assert set(rows) == {"ffcv", "dali-beton", "torchvision"}
    chosen = cores.pick_cpus(1)
    for name, r in rows.items():
        c = r["confinement"]
        assert r["cores"] == 1 and r["cpus"] == chosen == c["cpus"] and r["workers"] == 1, name
        assert c["threads_outside"] == {} and c["processes_outside"] == {}, (name, c)
        assert c["torch_threads"] == 1 and c["numba_threads"] == 1, (name, c)
    assert rows["torchvision"]["confinement"]["processes"] >= 1  # its DataLoader worker, confined too
    assert rows["ffcv"]["confinement"]["threads"] >= 2  # the decoding thread beside the main one
    assert rows["dali-beton"]["dali_threads"] == 1
    assert "| 1 CPU: img/s (cores) |" in (tmp_path / "out" / "loader.md").read_text()
    ((path, record),) = reference.load_all(tmp_path / "cpu", need_gpu=False)
    assert path.name.startswith("cpu-") and record["gpu"] is None and record["cpu"]["model"]
    kept = record["loader_cores"]["rows"]
    assert {(r["backend"], r["res"], r["cores"]) for r in kept} == {(b, 32, 1) for b in rows}
    assert all(r["threads_outside"] == 0 and r["processes_outside"] == 0 and r["images_per_s"] > 0 for r in kept)
    assert "48 samples in" in record["loader_cores"]["settings"]["data"]  # what the rows were measured on


def test_bad_cores_arguments_are_one_line(tmp_path, capsys):
    from benchmarks.loader_bench import main

    assert main(["--backend", "ffcv", "--cores", str(len(ALLOWED) + 1)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--cores {len(ALLOWED) + 1}: this process may run on" in err and "\n" not in err
    assert main(["--backend", "ffcv", "--record"]) == 2
    assert "--reference and --record keep --cores rows" in capsys.readouterr().err
