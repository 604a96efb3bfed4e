"""What a run leaves for people and tools, written by rank 0 only.

logs/<run>/training_log.md     one table row per epoch (redrawn in full each epoch, so a resumed run keeps one table)
logs/<run>/training_log.json   the same records as a JSON list
logs/<run>/config.yaml         the resolved config
logs/<run>/loss.png accuracy.png lr.png
runs/<run>/                    TensorBoard: per-step train/* and per-epoch epoch/* scalars
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from training import plots
from training.layout import RunPaths

COLUMNS = [  # (record key, header, format)
    ("epoch", "Epoch", "{:d}"),
    ("train_loss", "Train loss", "{:.4f}"),
    ("train_top1", "Train top-1 %", "{:.2f}"),
    ("val_loss", "Val loss", "{:.4f}"),
    ("val_top1", "Top-1 %", "{:.2f}"),
    ("val_top5", "Top-5 %", "{:.2f}"),
    ("ema_top1", "EMA top-1 %", "{:.2f}"),
    ("lr", "LR", "{:.5g}"),
    ("res", "Res", "{:d}"),
    ("epoch_time_s", "Epoch time (s)", "{:.1f}"),
    ("images_per_s", "img/s", "{:.1f}"),
    ("data_wait_pct", "Data wait %", "{:.1f}"),
]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # UTF-8 whatever the locale (LANG=C would make it ASCII); a path Python holds with surrogate escapes (a non-UTF-8
    # name under such a locale) is written back as the bytes it came from
    tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
    os.replace(tmp, path)


def markdown_table(records: list[dict], title: str, header_lines: list[str]) -> str:
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in records)] or COLUMNS
    lines = [f"# Training log: {title}", ""] + header_lines + [""]
    lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
    lines.append("|" + "|".join("---:" for _ in cols) + "|")
    for r in records:
        cells = [fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tensorboard_path(path: Path) -> str | None:
    """`path` as TensorBoard can use it, or None. TensorBoard encodes file names as UTF-8 itself and then makes the
    folders with Python's file-system encoding; under a non-UTF-8 locale (LANG=C with PYTHONUTF8=0) a non-ASCII path
    passes one of the two and fails the other, so TensorBoard cannot write there."""
    raw = os.fsencode(path)
    try:
        text = raw.decode("utf-8")
        return text if os.fsencode(text) == raw else None
    except (UnicodeDecodeError, UnicodeEncodeError):
        return None


class RunLog:
    """Per-epoch records to Markdown/JSON/PNG and scalars to TensorBoard. Construct it on rank 0 only."""

    def __init__(
        self,
        paths: RunPaths,
        header_lines: list[str],
        records: list[dict] | None = None,
        tensorboard: bool = True,
        purge_step: int | None = None,
    ):
        """purge_step: a resumed run's global step; TensorBoard hides the points the interrupted process logged from
        there on, which the resumed run logs again."""
        self.run = paths.run
        self.dir = paths.logs
        self.dir.mkdir(parents=True, exist_ok=True)
        self.header_lines = header_lines
        self.records: list[dict] = list(records or [])
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            events = tensorboard_path(paths.events)
            if events is None:
                print(
                    f"warning: TensorBoard needs a path it can write as UTF-8; {os.fsencode(paths.events)!r} is not "
                    "one, so no TensorBoard events are written (the Markdown, JSON and plots are)",
                    file=sys.stderr,
                    flush=True,
                )
            else:
                self.tb = SummaryWriter(log_dir=events, purge_step=purge_step)

    @staticmethod
    def read_records(paths: RunPaths) -> list[dict]:
        path = paths.logs / "training_log.json"
        return json.loads(path.read_text()) if path.is_file() else []

    def write_config(self, yaml_text: str) -> None:
        _write_atomic(self.dir / "config.yaml", yaml_text)

    def step(self, step: int, scalars: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def epoch(
        self, record: dict, lr_at: Callable[[int], float], total_steps: int, steps_per_epoch: int, done_steps: int
    ) -> None:
        # A resumed run re-trains no finished epoch, but keep the table monotonic should one be repeated.
        self.records = [r for r in self.records if r["epoch"] < record["epoch"]] + [record]
        _write_atomic(self.dir / "training_log.json", json.dumps(self.records, indent=1) + "\n")
        _write_atomic(self.dir / "training_log.md", markdown_table(self.records, self.run, self.header_lines))
        plots.plot_metrics(self.records, self.dir, self.run)
        plots.plot_lr(lr_at, total_steps, steps_per_epoch, done_steps, self.dir / "lr.png", self.run)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch" and v is not None:
                    self.tb.add_scalar(f"epoch/{k}", v, record["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
