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
