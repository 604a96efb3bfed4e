"""dataset_tools.locks: one writer per folder; a dead holder's lock is free again (the kernel releases flock)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal

import pytest

from dataset_tools.locks import FolderBusy, folder_lock, lock_holder


def _hold(folder, ready, release):
    with folder_lock(folder, "a test holder"):
        ready.set()
        release.wait(60)


def test_second_holder_is_refused_naming_folder_pid_and_purpose(tmp_path):
    folder = tmp_path / "out"
    with folder_lock(folder, "rn50 convert") as path:
        assert path.parent == folder and folder.is_dir()
        holder = lock_holder(folder)
        assert holder["pid"] == os.getpid() and holder["purpose"] == "rn50 convert"
        with pytest.raises(FolderBusy) as caught:
            with folder_lock(folder, "another rn50 convert", hint="choose another --out-dir"):
                pass
        message = str(caught.value)
        assert str(folder) in message and f"pid {os.getpid()}" in message and "rn50 convert" in message
        assert message.endswith("choose another --out-dir") and "\n" not in message
        assert caught.value.pid == os.getpid()
    assert lock_holder(folder) is None
    with folder_lock(folder, "again"):  # released on leaving the block
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(tmp_path, ready, release))
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(FolderBusy, match=f"pid {child.pid}"):
            with folder_lock(tmp_path, "me"):
                pass
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    assert lock_holder(tmp_path) is None
    with folder_lock(tmp_path, "me"):
        assert lock_holder(tmp_path)["pid"] == os.getpid()


def test_unwritable_place_is_an_os_error(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(OSError):
        with folder_lock(tmp_path / "file.txt" / "sub", "me"):
            pass
