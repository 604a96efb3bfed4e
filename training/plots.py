"""PNG plots a person reads: loss, accuracy, learning rate, LR-finder curve. Matplotlib's Agg backend, no display."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)  # a viewer refreshing the file never sees half a PNG


def plot_metrics(records: Sequence[dict], out_dir: Path, title: str) -> list[Path]:
    """loss.png (train/val loss), accuracy.png (train top-1, val top-1/top-5, EMA top-1 if any), by epoch."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    out_dir = Path(out_dir)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(epochs, [r["train_loss"] for r in records], "o-", label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in records], "s-", label="val loss")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_dir / "loss.png")
    plt.close(fig)
    written.append(out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(epochs, [r["train_top1"] for r in records], "o-", label="train top-1")
    ax.plot(epochs, [r["val_top1"] for r in records], "s-", label="val top-1")
    ax.plot(epochs, [r["val_top5"] for r in records], "^-", label="val top-5")
    if any(r.get("ema_top1") is not None for r in records):
        ax.plot(epochs, [r.get("ema_top1") for r in records], "d--", label="EMA val top-1")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out_dir / "accuracy.png")
    plt.close(fig)
    written.append(out_dir / "accuracy.png")
    return written


def plot_lr(
    lr_at: Callable[[int], float], total_steps: int, steps_per_epoch: int, done_steps: int, path: Path, title: str
) -> Path:
    """The whole planned schedule per step; the part already trained drawn solid, the rest dashed."""
    plt = _pyplot()
    stride = max(1, total_steps // 2000)
    steps = list(range(0, total_steps, stride)) + [total_steps - 1]
    xs = [s / steps_per_epoch for s in steps]
    ys = [lr_at(s) for s in steps]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    done = [i for i, s in enumerate(steps) if s <= done_steps]
    rest = [i for i, s in enumerate(steps) if s >= done_steps]
    if done:
        ax.plot([xs[i] for i in done], [ys[i] for i in done], "-", color="C0", label="trained")
    if rest:
        ax.plot([xs[i] for i in rest], [ys[i] for i in rest], "--", color="C0", alpha=0.5, label="planned")
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"{title}: learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_lr_finder(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: dict, path: Path, title: str
) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, ".", alpha=0.35, label="loss")
    ax.plot(lrs, smoothed, "-", label="smoothed loss")
    for key, style, label in (
        ("steepest_lr", "g--", "steepest descent"),
        ("conservative_max_lr", "k:", "conservative (min / 10)"),
        ("suggested_max_lr", "r-", "suggested max LR (min loss)"),
    ):
        if suggestion.get(key):
            ax.axvline(suggestion[key], color=style[0], linestyle=style[1:], label=f"{label}: {suggestion[key]:.3g}")
    ax.set_xscale("log")
    finite = [v for v in smoothed if v == v]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), min(hi, finite[0] * 1.5 + 0.5) + 0.1 * (hi - lo + 1e-9))
    ax.set(xlabel="learning rate (log)", ylabel="training loss", title=f"{title}: LR range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return Path(path)
