"""A benchmark at a given number of logical CPUs: what a smaller machine (or a cloud instance's share per GPU) would
give, measured on this one.

    rn50 bench loader --data-dir BETONS --backend ffcv,dali-beton --cores 1,2        # one row per backend and count
    rn50 bench keepup --data-dir BETONS --backend ffcv --cores 8,12

Each count runs in a process of its own (`run_counts`), which confines itself before it imports torch, numba or DALI
(`confine`): every thread of the process to the chosen CPUs (`os.sched_setaffinity`; threads and worker processes
started later inherit it), and the thread counts of the libraries to match (OMP_NUM_THREADS and NUMBA_NUM_THREADS
before they are imported, torch.set_num_threads after). The loader's own threads are then set by the benchmark
(workers = the count; DALI's threads = the count). A fresh process per count matters: numba sizes its thread pool
once, when it first launches it.

Which CPUs: the first `n` of those this process may run on, taking both hardware threads of a core before the next
core (`pick_cpus`), because that is what a cloud vCPU is (on EC2 every vCPU is a hardware thread of a core, two per
core, except on T2 and Graviton instances), so 8 logical CPUs here stand for 8 vCPUs there rather than 8 whole cores.

What actually ran where is recorded, not assumed (`snapshot`): the allowed CPUs of every thread of the process and of
every child process (torchvision's DataLoader workers), taken while the loader runs, and torch's and numba's thread
counts; the tests check it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def core_of(cpu: int) -> tuple[int, int]:
    """(package, core) of a logical CPU from sysfs; (0, cpu) where the topology is not readable (each CPU its own
    core)."""
    topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
    try:
        return int((topo / "physical_package_id").read_text()), int((topo / "core_id").read_text())
    except (OSError, ValueError):
        return 0, cpu


def pick_cpus(n: int, allowed: list[int] | None = None, core=core_of) -> list[int]:
    """The `n` logical CPUs to confine to: the allowed CPUs grouped by physical core (in the order the cores first
    appear), both hardware threads of a core before the next core, as a cloud instance's vCPUs come."""
    allowed = sorted(allowed_cpus() if allowed is None else allowed)
    if not 1 <= n <= len(allowed):
        raise ValueError(
            f"--cores {n}: this process may run on {len(allowed)} logical CPUs ({_ranges(allowed)}); "
            f"choose counts from 1 to {len(allowed)}"
        )
    by_core: dict[tuple[int, int], list[int]] = {}
    for cpu in allowed:
        by_core.setdefault(core(cpu), []).append(cpu)
    ordered = [cpu for cpus in by_core.values() for cpu in cpus]
    return sorted(ordered[:n])


def smt_pairs(cpus: list[int], core=core_of) -> int:
    """How many of `cpus` share a physical core with another of them (hardware-thread siblings)."""
    cores: dict[tuple[int, int], int] = {}
    for cpu in cpus:
        cores[core(cpu)] = cores.get(core(cpu), 0) + 1
    return sum(k for k in cores.values() if k > 1)


def parse_counts(text: str) -> list[int]:
    """ "1,2,4" -> [1, 2, 4]; ValueError naming the flag otherwise."""
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--cores wants counts of logical CPUs like 1,2,4, got {text!r}")
    return counts


def _ranges(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus)


def thread_ids() -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir("/proc/self/task"))
    except OSError:  # not Linux: the calling thread only
        return [0]


def confine(cpus: list[int]) -> None:
    """Confine this process to `cpus`: every thread it has now (threads started later inherit it), the thread counts
    of libraries not imported yet (environment) and torch's, if it is imported."""
    n = len(cpus)
    for var in THREAD_ENV:
        os.environ[var] = str(n)
    for tid in thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def confine_from_flag(text: str | None) -> list[int] | None:
    """The child's side of `run_counts`: `--confined-to 0,1` confines this process and returns the CPUs."""
    if not text:
        return None
    cpus = [int(x) for x in text.split(",")]
    confine(cpus)
    import torch  # its count is set after import too: a process-wide default that its own import may have reset

    torch.set_num_threads(len(cpus))
    return cpus


def exit_child(code: int) -> None:
    """End a --cores child once its results are written, without the interpreter's teardown: in a process confined
    to one CPU that has forked DataLoader workers, numba's TBB layer can wait forever while it unloads (seen here:
    unload_tbb in task_group::wait, after every result was on disk)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _affinity(pid: int) -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return None


def snapshot(cpus: list[int]) -> dict:
    """Where this process's threads and child processes may run, now, against `cpus`: counts, and any found
    outside (by thread id or pid, with their allowed CPUs); torch's and numba's thread counts."""
    wanted = sorted(cpus)
    threads = {tid: _affinity(tid) for tid in thread_ids()}
    out = {
        "cpus": wanted,
        "threads": len(threads),
        "threads_outside": {str(t): a for t, a in threads.items() if a is not None and a != wanted},
        "processes": 0,
        "processes_outside": {},
    }
    try:
        import psutil

        children = psutil.Process().children(recursive=True)
        affinities = {}
        for child in children:
            try:
                affinities[child.pid] = sorted(child.cpu_affinity())
            except (psutil.Error, AttributeError):
                continue
        out["processes"] = len(affinities)
        out["processes_outside"] = {str(p): a for p, a in affinities.items() if a != wanted}
    except ImportError:
        pass
    if "torch" in sys.modules:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        out["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    return out


def run_counts(
    module: str,
    argv: list[str],
    counts: list[int],
    result_name: str,
    on_result,
    deadline: float | None = None,
    prog: str = "rn50 bench",
) -> list[str]:
    """Run `python -m module argv --confined-to CPUS --out TMP` once per count, each child confined to `pick_cpus`
    of it; hand (count, cpus, the child's TMP/result_name JSON) to `on_result` as each one ends. A child that fails,
    or is still running at `deadline` (time.time()), costs its own count: returns one line per count lost."""
    lost = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    for n in counts:
        cpus = pick_cpus(n)
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            lost.append(f"{n} cores (budget)")
            print(f"{prog}: skipped {n} cores (the budget is spent)", file=sys.stderr, flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix=f"rn50_cores{n}_") as tmp:
            cmd = [sys.executable, "-m", module, *argv, "--confined-to", _ranges(cpus), "--out", tmp]
            print(f"== {n} logical CPU{'s' if n != 1 else ''} ({_ranges(cpus)})", flush=True)
            proc = subprocess.Popen(cmd, env=env)  # in our process group: a timeout around us reaches it too
            try:
                code = proc.wait(timeout=left)
            except BaseException as e:
                if not isinstance(e, subprocess.TimeoutExpired):  # we are being stopped: so is the child
                    proc.kill()
                    raise
                proc.kill()  # torchvision's workers follow: they watch their parent
                proc.wait()
                lost.append(f"{n} cores (stopped at the budget)")
                print(f"{prog}: {n} cores stopped at the budget", file=sys.stderr, flush=True)
                continue
            result = Path(tmp) / result_name
            if code != 0 or not result.is_file():
                lost.append(f"{n} cores (the run ended with {code}: its output above says why)")
                continue
            on_result(n, cpus, json.loads(result.read_text()))
    return lost
