"""One writer per folder: an exclusive lock that dies with its holder.

    from dataset_tools.locks import FolderBusy, folder_lock

    try:
        with folder_lock(out, "rn50 convert", hint="wait for it to finish, or choose another --out-dir"):
            ...  # only one process at a time gets here for `out`
    except FolderBusy as e:
        print(f"rn50 convert: error: {e}")  # "<out>: in use by rn50 convert (pid 4242 on host, since ...); <hint>"

The lock is `fcntl.flock` on `<folder>/.rn50.lock`, so the kernel releases it when the holder ends in any way
(SIGKILL, OOM, a crash): a lock is never stale, and a folder is free exactly when nobody works in it. What the lock
file holds (pid, host, purpose, start time) only serves the message of a refused process.

Notes for callers:
- The lock belongs to the open file, which fork() shares: forked children (DataLoader or writer workers) hold it too
  until they exit. Children here exit with their parent (dataset_tools.processes.exit_with_parent).
- flock is per open file, not per process: a second folder_lock on the same folder in the same process is refused
  too. Under DDP let one rank (rank 0) hold it.
- The file is left in place when the lock is released (deleting it would race with a process that has just opened
  it). On network file systems flock works on NFSv4 and Lustre with flock mounts; it is advisory everywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".rn50.lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock. `pid` and `purpose` describe it (None when it has not said yet)."""

    def __init__(self, folder: Path, holder: dict | None, hint: str = "") -> None:
        self.folder = folder
        holder = holder or {}
        self.pid: int | None = holder.get("pid")
        self.purpose: str | None = holder.get("purpose")
        who = self.purpose or "another process"
        details = [f"pid {self.pid}" if self.pid else "pid unknown"]
        if holder.get("host") and holder["host"] != socket.gethostname():
            details[0] += f" on {holder['host']}"
        if holder.get("since"):
            details.append(f"since {holder['since']}")
        super().__init__(f"{folder}: in use by {who} ({', '.join(details)})" + (f"; {hint}" if hint else ""))


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def folder_lock(folder: str | Path, purpose: str, *, hint: str = "") -> Iterator[Path]:
    """Hold `folder`'s lock (the folder is created if missing) for the with-block; yields the lock file's path.

    Raises FolderBusy at once, without waiting, when another process holds it (`hint` is appended to its message:
    what the user can do), and OSError when the folder or its lock file cannot be created (read-only, not a folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusy(folder, _read_holder(path), hint) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": purpose,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a free folder's lock file names nobody
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_holder(folder: str | Path) -> dict | None:
    """Who holds `folder`'s lock ({pid, host, purpose, since}), or None when nobody does."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(path) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
