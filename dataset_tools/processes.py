"""Child processes that must not outlive the process that started them.

A worker whose parent was killed (SIGKILL, the OOM killer, a node agent) has nobody to hand its work to: it should end
at once, instead of decoding or writing on for minutes and holding files, locks and memory. PyTorch's DataLoader
workers notice a dead parent only every 5 s and may then block on a full pipe; FFCV-style writer workers never look.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(parent_pid: int, poll_seconds: float = 0.2) -> None:
    """Make this (child) process exit with status 1 within `poll_seconds` of `parent_pid` ending.

    Call it first thing in a started child. A daemon thread polls getppid(): a child whose parent dies is re-parented
    (to init or a subreaper), so its parent pid changes. Linux's prctl(PR_SET_PDEATHSIG) is not used: it fires when
    the parent *thread* that forked the child ends, which would kill persistent workers started from a short-lived
    thread, and it does not exist elsewhere."""
    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_seconds)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


WORKERS_PER_CORE = 4  # the most loader workers per usable core any backend accepts


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def workers_problem(workers: int) -> str | None:
    """One line when `workers` is more than this machine can run, the same rule for every backend: more than
    WORKERS_PER_CORE per usable core. Thousands of worker processes (torchvision) or threads (ffcv, DALI) only
    compete for the cores and memory: a run with --workers 10000 made no step in two minutes on 2 cores."""
    cores = usable_cores()
    if workers > WORKERS_PER_CORE * cores:
        return (
            f"--workers {workers}: this process may use {cores} core{'s' if cores != 1 else ''}, and more than "
            f"{WORKERS_PER_CORE} workers per core only compete for them; use at most {WORKERS_PER_CORE * cores}, or -1 "
            "(this rank's share of the cores, minus one)"
        )
    return None
