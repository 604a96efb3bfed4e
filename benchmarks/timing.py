"""The one way every benchmark times: a window, a measurement over `next_batch` (with or without a train step), and
the keep-up method.

    with Window(device) as w:                                   # one stretch of work
        ...
    w.seconds, w.process_cores, w.busy_pct

    m = measure(next_batch, device, step=train_step_fn(parts, device), warmup=10, window=200, windows=1)
    m.images_per_s, m.data_wait_share, m.process_cores, m.warmup_s, m.windows_images_per_s

    k = keep_up(loader, parts, alone, device, epoch=1, warmup=10, window=200)   # loader alone, then feeding the step
    k["ratio"], k["verdict"]

A window is timed on the GPU's timeline with CUDA events (from its first launch to the end of its last kernel: a GPU
starved of data counts, and a loader alone is done when its last batch is on the device, because every backend makes
the current stream wait for it), by the wall clock otherwise. Beside it: the CPU seconds this process spent per second
of the window (`process_cores`; FFCV's and DALI's threads run in the process, torchvision's worker processes do not)
and the whole machine's busy share (`busy_pct`, other programs included). CPU times count clock ticks (10 ms), so
over a window shorter than MIN_CPU_WINDOW_S they say nothing and are None ("too short to measure").

`measure` runs `warmup` untimed batches (compilation, cuDNN autotuning, a pipeline's first batches: `warmup_s`), then
`windows` timed windows of `window` batches each (`window=None`: until `next_batch` raises StopIteration, e.g. the
rest of an epoch) and reports the median window. The data-wait share is the host time spent inside `next_batch()`:
because the GPU runs queued work meanwhile, it is an upper bound on the GPU's idle time.

The keep-up method (`keep_up`): the step alone on a batch already on the device (the ceiling, measured once per model
and resolution by the caller), then the loader alone and the loader feeding that step, each inside one epoch of its
own after `warmup` of that epoch's batches, so epoch starts, pipeline builds and JIT compilation never fall into a
window. The ratio end to end / step alone is the verdict: >= KEEPS_UP "keeps up".
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

KEEPS_UP = 0.95
MIN_CPU_WINDOW_S = 0.5  # 50 clock ticks: a CPU-time figure over less is mostly rounding
TOO_SHORT = "too short to measure"


def _machine_busy_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, or None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    busy = sum(getattr(t, f, 0.0) for f in ("user", "system", "nice", "irq", "softirq"))
    return busy, busy + t.idle + getattr(t, "iowait", 0.0)


class Window:
    """One timed stretch of work: `seconds` (CUDA events on a GPU, wall clock otherwise), `wall_s`, `process_cores`
    (this process's CPU seconds per second) and `busy_pct` (the machine's busy share), both None when too short."""

    def __init__(self, device) -> None:
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def __enter__(self) -> Window:
        self.machine0 = _machine_busy_s()
        self.cpu0 = time.process_time()  # user + system time of every thread of this process
        self.t0 = time.perf_counter()
        if self.cuda:
            import torch

            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
        self.wall_s = time.perf_counter() - self.t0
        cpu_s = time.process_time() - self.cpu0
        machine = _machine_busy_s()
        self.seconds = self.start.elapsed_time(end) / 1e3 if self.cuda else self.wall_s
        self.process_cores = self.busy_pct = None
        if self.wall_s >= MIN_CPU_WINDOW_S:
            self.process_cores = cpu_s / self.wall_s
            if machine is not None and self.machine0 is not None:
                total = machine[1] - self.machine0[1]
                self.busy_pct = 100.0 * (machine[0] - self.machine0[0]) / total if total > 0 else None


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else None


@dataclass
class Measurement:
    """What `measure` saw: the warm-up's seconds and one dict per timed window (images, seconds, wait_s,
    process_cores, busy_pct). The figures are medians over the windows."""

    warmup_s: float
    windows: list[dict] = field(default_factory=list)

    @property
    def windows_images_per_s(self) -> list[float]:
        return [w["images"] / w["seconds"] for w in self.windows]

    @property
    def images(self) -> int:
        return sum(w["images"] for w in self.windows)

    @property
    def images_per_s(self) -> float:
        return _median(self.windows_images_per_s)

    @property
    def data_wait_share(self) -> float:
        return _median([min(1.0, w["wait_s"] / w["seconds"]) for w in self.windows])

    @property
    def process_cores(self) -> float | None:
        return _median([w["process_cores"] for w in self.windows])

    @property
    def busy_pct(self) -> float | None:
        return _median([w["busy_pct"] for w in self.windows])


def measure(
    next_batch: Callable[[], tuple],
    device,
    *,
    step: Callable[[object, object, int], object] | None = None,
    warmup: int = 0,
    window: int | None,
    windows: int = 1,
) -> Measurement:
    """`warmup` untimed batches, then `windows` windows of `window` batches (None: until StopIteration) from
    `next_batch()`, each handed to `step(images, labels, i)` when there is one. See the module docstring."""
    i = 0
    with Window(device) as w:
        for _ in range(warmup):
            images, labels = next_batch()
            if step is not None:
                step(images, labels, i)
            i += 1
    result = Measurement(warmup_s=w.wall_s)
    for _ in range(windows):
        wait, n, count = 0.0, 0, 0
        with Window(device) as w:
            while window is None or count < window:
                t0 = time.perf_counter()
                try:
                    images, labels = next_batch()
                except StopIteration:
                    if window is not None:
                        raise
                    break
                wait += time.perf_counter() - t0
                n += images.shape[0]
                count += 1
                if step is not None:
                    step(images, labels, i)
                i += 1
        result.windows.append(
            {
                "images": n,
                "batches": count,
                "seconds": w.seconds,
                "wait_s": wait,
                "process_cores": w.process_cores,
                "busy_pct": w.busy_pct,
            }
        )
    return result


def train_step_fn(parts, device) -> Callable[[object, object, int], object]:
    """`step` for `measure`: the trainer's own train step (training.engine.train_step) on one batch."""
    from training.engine import train_step

    return lambda images, labels, i: train_step(parts, [(images, labels)], i, device)


def in_epoch(loader, epoch: int, device, *, step=None, warmup: int, window: int, windows: int = 1) -> Measurement:
    """`measure` over epoch `epoch` of `loader`: its first `warmup` batches untimed, then the windows, all inside that
    one epoch. ValueError naming the fix when the epoch is too short."""
    need = warmup + window * windows
    if len(loader) < need:
        raise ValueError(
            f"{loader.num_samples} samples make {len(loader)} batches per epoch, fewer than the {warmup} + "
            f"{windows} x {window} the timing needs (make more with rn50 bench data --samples, or shorten "
            "--warmup/--window)"
        )
    loader.set_epoch(epoch)
    batches: Iterator = iter(loader)
    try:
        return measure(batches.__next__, device, step=step, warmup=warmup, window=window, windows=windows)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def verdict(ratio: float) -> str:
    return "keeps up" if ratio >= KEEPS_UP else "loader-bound"


def keep_up(loader, parts, alone: Measurement, device, *, epoch: int, warmup: int, window: int, windows: int = 1):
    """The keep-up method: the loader alone in epoch `epoch`, then feeding `parts`' step in epoch `epoch + 1`,
    against `alone` (the same step on a batch already on the device). Returns loader_alone, fed (Measurements),
    ratio and verdict."""
    solo = in_epoch(loader, epoch, device, warmup=warmup, window=window, windows=windows)
    fed = in_epoch(
        loader, epoch + 1, device, step=train_step_fn(parts, device), warmup=warmup, window=window, windows=windows
    )
    ratio = fed.images_per_s / alone.images_per_s
    return {"loader_alone": solo, "fed": fed, "ratio": ratio, "verdict": verdict(ratio)}
