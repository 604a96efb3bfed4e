"""Stop control: SIGTERM and SIGINT as a request to stop at the next step boundary, with a checkpoint, and the
step-boundary agreement between ranks on when to save and when to stop (`StepControl`).

A reclaimed spot instance (systemd sends SIGTERM, then SIGKILL ~90 s later), `torchrun` shutting down (it forwards
SIGTERM/SIGINT to its workers, then sends SIGKILL after 30 s) and Ctrl-C all arrive here. The handler only records
the signal: saving from inside a handler could interrupt a collective or a half-done optimizer step. The trainer
polls `requested` at every step boundary (and between validation batches), agrees with the other ranks, writes the
checkpoint and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the code a shell reports for a
process killed by that signal: schedulers and `torchrun --max-restarts` treat it as a failure, so they restart the
job (which then resumes with `--resume auto`) instead of taking it for a finished run.

A stop that arrives while the training thread waits for a batch gets WAIT_GRACE_S seconds for the batch to come (a
healthy loader delivers within them, and the step boundary then saves as usual); a loader still silent after them
is stuck -- a dead worker, a full /dev/shm, a hung file system -- and the wait ends with `StopWhileWaiting`, the run
with the last checkpoint standing. (SIGALRM times the grace; the handler raises inside the blocked `next()`.)

A third SIGINT raises KeyboardInterrupt: a person pressing Ctrl-C again and again wants out now (the last
checkpoint stays intact, as after a SIGKILL). One Ctrl-C under torchrun can deliver two SIGINTs to a worker (from
the terminal and forwarded by torchrun), so the second one does not count as impatience.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCE_AFTER_SIGINTS = 3
WAIT_GRACE_S = 10.0  # how long a stop waits for a loader that is late with a batch before calling it stuck


class StopWhileWaiting(Exception):
    """A stop signal arrived while the loader was late with a batch, and no batch came within WAIT_GRACE_S."""

    def __init__(self, signum: int, waited_s: float) -> None:
        super().__init__(f"{signal_name(signum)} while waiting {waited_s:.0f} s for the loader's next batch")
        self.signum, self.waited_s = signum, waited_s


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT set `requested` (the first signal's number) instead of killing
    the process. Handlers can only be installed from the main thread; elsewhere this is inert (requested stays 0)."""

    def __init__(self, grace_s: float = WAIT_GRACE_S) -> None:
        self.requested = 0
        self.grace_s = grace_s
        self._sigints = 0
        self._previous: dict[int, object] = {}
        self._waiting_since: float | None = None  # set while the training thread is blocked in the loader

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested = signum
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints >= FORCE_AFTER_SIGINTS:
                raise KeyboardInterrupt
        if self._waiting_since is not None and signal.SIGALRM in self._previous:
            waited = time.monotonic() - self._waiting_since
            if waited >= self.grace_s:
                raise StopWhileWaiting(self.requested, waited)
            signal.setitimer(signal.ITIMER_REAL, self.grace_s - waited)  # look again when the grace is over

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and self._waiting_since is not None:
            raise StopWhileWaiting(self.requested, time.monotonic() - self._waiting_since)

    def waiting(self, batches: Iterator) -> Iterator:
        """Yield from `batches`, marking the time spent blocked in next(): a stop that arrives then ends the wait
        after the grace if no batch comes (`StopWhileWaiting`, raised from the blocked next())."""
        while True:
            self._waiting_since = time.monotonic()
            if self.requested and signal.SIGALRM in self._previous:  # a stop came before this wait: same grace
                signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            try:
                item = next(batches)
            except StopIteration:
                return
            finally:
                self._waiting_since = None
                if signal.SIGALRM in self._previous:
                    signal.setitimer(signal.ITIMER_REAL, 0)  # a batch came: no alarm for this wait
            yield item

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
            self._previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._alarm)
        return self

    def __exit__(self, *exc: object) -> None:
        if signal.SIGALRM in self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()


class StepControl:
    """What happens at a step boundary: save a mid-epoch checkpoint (every N steps, every M minutes), stop (a
    signal). Under DDP the ranks agree through one all-reduce of two integers per step on a CPU (gloo) group: the
    signal may reach ranks at different steps, and the minutes are counted on rank 0's clock, yet all ranks must
    save and stop at the same step. The cost is one small host round trip per step, no GPU sync.

    `agree(values)`: the element-wise max of small integers over ranks (training.distributed.all_reduce_max_cpu)."""

    def __init__(self, signals: StopSignals, every: int, minutes: float, is_main: bool, agree) -> None:
        self.signals, self.every, self.seconds = signals, every, minutes * 60.0
        self.is_main, self.agree = is_main, agree
        self.last_save = time.monotonic()
        self.stop_signal = 0  # the agreed signal number once a stop is decided

    @property
    def saves_mid_epoch(self) -> bool:
        """Whether checkpoints are written inside epochs (and so before each validation)."""
        return self.every > 0 or self.seconds > 0

    def poll(self) -> tuple[int, bool]:
        """(signal number or 0, minutes due), the same on every rank."""
        due = self.is_main and self.seconds > 0 and time.monotonic() - self.last_save >= self.seconds
        signum, due = self.agree([self.signals.requested, int(due)])
        if signum:
            self.stop_signal = signum
        return signum, bool(due)

    def save_due(self, steps_done: int) -> tuple[int, bool]:
        """At the boundary after `steps_done` steps of an epoch: (signal number or 0, whether to save here)."""
        signum, due = self.poll()
        return signum, bool(signum or due or (self.every and steps_done % self.every == 0))

    def stop_requested(self) -> bool:
        return bool(self.poll()[0])

    def saved(self) -> None:
        self.last_save = time.monotonic()
