"""benchmarks.timing, the one way every benchmark times: what a measurement counts (batches, images, steps, windows,
waits), when an epoch is too short, and the keep-up method's ratio -- never how fast anything is."""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks import timing

CPU = torch.device("cpu")


def batches(n: int, size: int = 4):
    for i in range(n):
        yield torch.full((size, 3, 2, 2), float(i)), torch.zeros(size, dtype=torch.long)


def test_measure_counts_warmup_windows_and_steps():
    seen = []
    it = batches(2 + 3 * 2)
    step = lambda x, y, i: seen.append((int(x[0, 0, 0, 0]), i))  # noqa: E731
    m = timing.measure(it.__next__, CPU, step=step, warmup=2, window=3, windows=2)
    assert seen == [(i, i) for i in range(8)]  # every batch stepped once, in order, numbered across the windows
    assert [w["batches"] for w in m.windows] == [3, 3] and m.images == 24
    rates = m.windows_images_per_s
    assert len(rates) == 2 and m.images_per_s == pytest.approx(sum(rates) / 2)  # the median of two windows
    assert m.warmup_s >= 0 and 0 <= m.data_wait_share <= 1


def test_a_window_of_none_runs_to_the_end_and_a_short_supply_is_an_error():
    it = batches(5)
    m = timing.measure(it.__next__, CPU, warmup=1, window=None)
    assert m.windows[0]["batches"] == 4 and m.images == 16
    it = batches(3)
    with pytest.raises(StopIteration):
        timing.measure(it.__next__, CPU, window=4)


def test_cpu_figures_of_a_short_window_are_none_and_of_a_long_one_are_there():
    with timing.Window(CPU) as w:
        pass
    assert w.process_cores is None and w.busy_pct is None and w.seconds == w.wall_s >= 0
    with timing.Window(CPU) as w:
        end = time.perf_counter() + timing.MIN_CPU_WINDOW_S + 0.05
        while time.perf_counter() < end:  # busy: this process's CPU time grows with the window
            pass
    assert w.process_cores is not None and w.process_cores > 0 and w.busy_pct is not None


class FakeLoader:
    """The contract's parts the timing uses: len, num_samples, set_epoch, iteration (one epoch)."""

    def __init__(self, n: int) -> None:
        self.n, self.epochs = n, []

    def __len__(self) -> int:
        return self.n

    num_samples = property(lambda self: 4 * self.n)

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return batches(self.n)


def test_in_epoch_stays_inside_one_epoch_and_says_when_it_is_too_short():
    loader = FakeLoader(6)
    m = timing.in_epoch(loader, 3, CPU, warmup=2, window=2, windows=2)
    assert loader.epochs == [3] and [w["batches"] for w in m.windows] == [2, 2]
    with pytest.raises(ValueError, match=r"6 batches per epoch, fewer than the 2 \+ 2 x 3 .*--samples"):
        timing.in_epoch(loader, 4, CPU, warmup=2, window=3, windows=2)


def test_keep_up_times_the_loader_alone_then_fed_in_epochs_of_their_own(monkeypatch):
    steps = []
    monkeypatch.setattr(timing, "train_step_fn", lambda parts, device: lambda x, y, i: steps.append(i))
    loader = FakeLoader(5)
    alone = timing.Measurement(warmup_s=0.0, windows=[{"images": 100, "seconds": 1.0, "wait_s": 0.0}])
    k = timing.keep_up(loader, object(), alone, CPU, epoch=7, warmup=1, window=4)
    assert loader.epochs == [7, 8] and steps == [0, 1, 2, 3, 4]  # the step runs in the second epoch only
    assert k["ratio"] == pytest.approx(k["fed"].images_per_s / 100.0)
    assert k["verdict"] == timing.verdict(k["ratio"]) and k["loader_alone"].images == 16
    assert timing.verdict(timing.KEEPS_UP) == "keeps up" and timing.verdict(0.5) == "loader-bound"
