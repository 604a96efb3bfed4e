"""Progress: tqdm's bar on a terminal, a plain line per interval anywhere else.

A bar redraws itself with carriage returns; written into a log file (`rn50 train ... > run.log`, a batch system's
output) that is thousands of `\\r` frames on one "line". Where the stream is not a terminal, `progress()` returns a
`LineProgress` with the same few methods (update, set_postfix, close), which writes one line every `interval` seconds
and one at the end.
"""

from __future__ import annotations

import sys
import time


class LineProgress:
    """tqdm's update / set_postfix / close, as a line every `interval` seconds: `desc: 1,234/5,000 img (25%), 310
    img/s, loss 2.31`."""

    def __init__(self, total: int | None, desc: str, unit: str, file, interval: float, initial: int = 0) -> None:
        self.total, self.desc, self.unit, self.file, self.interval = total, desc, unit, file, interval
        self.n, self.initial, self.postfix = initial, initial, ""
        self.start = self.last = time.monotonic()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line()

    def _line(self) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {(self.n - self.initial) / elapsed:,.1f} {self.unit}/s"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share}{rate}{extra}", file=self.file, flush=True)


def progress(
    total: int | None,
    desc: str,
    unit: str = "it",
    disable: bool = False,
    file=None,
    interval: float = 30.0,
    initial: int = 0,
    **tqdm_kwargs,
):
    """tqdm on a terminal; a LineProgress elsewhere; a silent tqdm when `disable`."""
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    if disable:
        return tqdm(total=total, disable=True)
    isatty = getattr(file, "isatty", None)
    if isatty is not None and isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=file, initial=initial, **tqdm_kwargs)
    return LineProgress(total, desc, unit, file, interval, initial)
