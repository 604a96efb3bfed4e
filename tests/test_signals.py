"""SIGTERM/SIGINT: a checkpoint at the next step boundary, a clean exit with 128 + the signal number, and a run that
still ends bit-identical; under torchrun one rank's signal stops every rank at the same step, and a restarted job
resumes by itself (--resume auto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _resume_helpers import RUNNER, assert_same_final_state, env, flags, latest, records, reference, run_killed

from training import checkpoint
from training.checkpoint import load_checkpoint
from training.signals import StopSignals, exit_code


def run_group(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own, killed whole on timeout (torchrun's workers would outlive it)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env(), start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{(out + err)[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_handler_only_records_the_signal_and_restores_the_previous_one():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary of the main thread
        assert s.requested == signal.SIGTERM  # recorded; the process lives on
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert s.requested == signal.SIGTERM  # the first signal is the one reported
        with pytest.raises(KeyboardInterrupt):  # a third SIGINT: a person insisting
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before
    assert exit_code(signal.SIGTERM) == 143 and exit_code(signal.SIGINT) == 130


def test_loader_workers_leave_stop_signals_to_the_trainer():
    """Ctrl-C reaches every process of the group; a DataLoader worker started by spawn/forkserver (Python 3.14's
    default) would die of it and fail the main process before it could save."""
    from pipeline.torchvision_loader import _worker_init

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _worker_init(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: we are still here
        time.sleep(0.01)
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_checkpoint_minutes_saves_mid_epoch_on_the_clock(synth_root, tmp_path, monkeypatch):
    written = []
    save_latest = checkpoint.save_latest

    def spy(state, run_dir):
        written.append((state["phase"], state["step"], state["loader"]["batch"]))
        return save_latest(state, run_dir)

    monkeypatch.setattr(checkpoint, "save_latest", spy)
    from _resume_helpers import run_in_process

    argv = flags(synth_root, tmp_path, epochs=1, checkpoint_every=0, checkpoint_minutes=1e-7, ema=False)
    assert run_in_process(argv) == 0
    # due after every step; the last step's state goes into the before-validation checkpoint instead
    assert written == [("mid_epoch", 1, 2), ("mid_epoch", 2, 4), ("mid_epoch", 3, 6), ("before_validation", 4, 0)]
    assert latest(tmp_path)["phase"] == "end_of_epoch"


@pytest.mark.slow  # three subprocess runs (~40 s on 2 cores)
def test_sigterm_and_ctrl_c_save_exit_cleanly_and_the_run_ends_bit_identical(synth_root, tmp_path_factory):
    expected = reference("torchvision", synth_root, tmp_path_factory)
    out = tmp_path_factory.mktemp("signalled")
    argv = flags(synth_root, out, checkpoint_every=0)  # the checkpoints come from the signals alone

    r = run_killed(argv, "step", 2, sig="TERM")  # a spot reclaim mid-epoch
    assert r.returncode == 143, r.stdout[-2000:] + r.stderr[-2000:]
    message = [line for line in r.stdout.splitlines() if "SIGTERM received" in line]
    assert len(message) == 1 and "epoch 0, step 2 of 4" in message[0] and "--resume" in message[0]
    state = latest(out)
    assert (state["phase"], state["step"], state["loader"]["epoch"], state["loader"]["batch"]) == ("mid_epoch", 2, 0, 4)
    assert state["epoch_progress"]["samples"] == 32  # 2 steps x 2 x 8 images: the epoch's log line stays whole

    # Ctrl-C reaches the whole process group, DataLoader workers included: they must leave it to the trainer
    proc = subprocess.Popen(
        [sys.executable, str(RUNNER), "{}", "--", *argv, "--resume", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
        start_new_session=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "STEP 3":  # the second step after the resume: epoch 1 is under way
                os.killpg(proc.pid, signal.SIGINT)
    finally:
        proc.wait(timeout=300)
    text = "".join(lines)
    assert proc.returncode == 130, text[-3000:]
    assert "SIGINT received" in text and "exited unexpectedly" not in text
    assert latest(out)["phase"] in ("mid_epoch", "before_validation")
    assert latest(out)["step"] >= 5

    r = run_killed([*argv, "--resume"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_final_state(expected, out)


@pytest.mark.slow  # torchrun with two workers, restarted twice (~1 min on 2 cores)
def test_torchrun_restarts_resume_by_themselves(coded_root, tmp_path):
    """Rank 1 alone gets SIGTERM: both ranks stop at the same step (rank 0 saves), exit 143, torchrun restarts them
    and --resume auto continues; then rank 0 is SIGKILLed mid-epoch once, and the next restart finishes the run."""
    out = tmp_path / "out"
    marker = tmp_path / "killed_once"
    kills = [
        {"rank": 1, "attempt": 0, "event": "step", "n": 3, "signal": "TERM"},
        {"rank": 0, "from_attempt": 1, "once": str(marker), "event": "step", "n": 2, "signal": "KILL"},
    ]
    argv = flags(
        coded_root,
        out,
        "ddp",
        batch_size=4,
        grad_accum=1,
        epochs=2,
        resume="auto",
        checkpoint_every=2,
        ema=False,
        mixup=0.0,
        cutmix=0.0,
        random_erase=0.0,
        auto_augment="none",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        "4",
        "--monitor-interval",
        "0.2",
        str(RUNNER),
        json.dumps(kills),
        "--",
        *argv,
    ]
    r = run_group(cmd, cwd=tmp_path, timeout=400)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    # three attempts: stopped by the signal (143), killed (-9), finished; each joined its group on fresh store keys
    assert "exitcode: 143" in text and "exitcode: -9" in text and "connectFullMesh" not in text
    stops = [line for line in r.stdout.splitlines() if "SIGTERM received" in line]
    assert len(stops) == 1 and "epoch 0, step 3 of 6" in stops[0]  # rank 0 reports the stop it agreed to
    resumed = [line for line in r.stdout.splitlines() if line.startswith("resumed")]
    assert resumed and "epoch 0, step 3 of 6" in resumed[0]  # the restart continued where both ranks stopped
    assert marker.exists()  # the SIGKILL happened, and a later attempt finished the run
    state = load_checkpoint(out / "checkpoints" / "ddp" / "checkpoint.pt")
    assert state["step"] == 12 and state["phase"] == "end_of_epoch" and len(state["rng"]) == 2
    fingerprints = state["rank_weight_fingerprints"]
    assert len(fingerprints) == 2 and fingerprints[0] == fingerprints[1]
    assert [rec["epoch"] for rec in records(out, "ddp")] == [0, 1]
    assert all(rec["val_samples"] == 16 for rec in records(out, "ddp"))
    assert not list(Path(out / "checkpoints" / "ddp").glob(".*.tmp-*"))


class SlowBatches:
    """An iterator whose next() blocks `seconds` (time.sleep is interrupted by a handler that raises)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(self.seconds)
        return "batch"


def signal_soon(signum: int, after: float) -> None:
    import threading

    threading.Timer(after, os.kill, (os.getpid(), signum)).start()


def test_a_stop_during_a_stuck_wait_ends_it_after_the_grace():
    from training.signals import StopWhileWaiting

    with StopSignals(grace_s=0.5) as s:
        signal_soon(signal.SIGTERM, 0.2)
        with pytest.raises(StopWhileWaiting, match=r"SIGTERM while waiting \d+ s for the loader's next batch") as e:
            next(s.waiting(SlowBatches(30)))  # stuck: no batch for 30 s
        assert e.value.signum == signal.SIGTERM and e.value.waited_s >= 0.5
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_stop_during_a_late_but_healthy_wait_waits_for_the_batch():
    """The batch comes within the grace: it is handed out, and the stop is left to the next step boundary."""
    with StopSignals(grace_s=5) as s:
        signal_soon(signal.SIGTERM, 0.1)
        assert next(s.waiting(SlowBatches(0.5))) == "batch"
        assert s.requested == signal.SIGTERM and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_stop_before_a_stuck_wait_also_ends_it():
    from training.signals import StopWhileWaiting

    with StopSignals(grace_s=0.3) as s:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded between two waits
        with pytest.raises(StopWhileWaiting):
            next(s.waiting(SlowBatches(30)))


STUCK_RUNNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from pipeline import torchvision_loader as tv

real = tv.TorchvisionLoader._batches

def stuck_after_two(self, *args, **kwargs):
    for i, batch in enumerate(real(self, *args, **kwargs)):
        if i == 2 and self.split == "train":
            print("STUCK", flush=True)
            time.sleep(3600)  # a loader that stops delivering: a hung mount, a stopped worker
        yield batch

tv.TorchvisionLoader._batches = stuck_after_two
from training.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_sigterm_ends_a_run_whose_loader_is_stuck(coded_root, tmp_path):
    """The loader delivers two batches, then nothing. SIGTERM used to wait for a step boundary that never came; now
    the run ends after the grace with one line, exit 143, and the checkpoint of step 2 stands."""
    from _train_helpers import argv

    from training.signals import WAIT_GRACE_S

    runner = tmp_path / "stuck.py"
    runner.write_text(STUCK_RUNNER)
    out = tmp_path / "out"
    flags = argv(coded_root, out, "stuck", epochs=1, batch_size=4, checkpoint_every=1)
    proc = subprocess.Popen(
        [sys.executable, str(runner), str(Path(__file__).resolve().parents[1]), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env(),
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "STUCK":
                proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10 * WAIT_GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(lines)
    assert proc.returncode == 143, text[-3000:]
    assert "SIGTERM while waiting" in text and "the loader is stuck, so no checkpoint is written now" in text
    (stopped,) = [x for x in text.splitlines() if "SIGTERM received: stopped with the checkpoint at" in x]
    assert "step 2" in stopped and "--resume" in stopped
    state = latest(out, "stuck")
    assert (state["phase"], state["step"]) == ("mid_epoch", 2)
