"""Progress output: a bar on a terminal, plain lines in a log file (no carriage-return frames)."""

from __future__ import annotations

import io
import subprocess
import sys

from conftest import REPO

from dataset_tools.progress import LineProgress, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_and_a_terminal_gets_the_bar():
    log = io.StringIO()
    bar = progress(10, "convert train", "img", file=log, interval=0.0)
    assert isinstance(bar, LineProgress)
    for _ in range(10):
        bar.update()
    bar.set_postfix(loss="2.31")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 11  # one per update (interval 0), one at the end
    assert lines[-1].startswith("convert train: 10/10 img (100%), ") and lines[-1].endswith(", loss 2.31")
    term = Terminal()
    bar = progress(10, "convert train", "img", file=term)
    bar.update(10)
    bar.close()
    assert "\r" in term.getvalue() and not isinstance(bar, LineProgress)  # tqdm's bar


def test_rn50_synth_into_a_log_file_writes_lines(tmp_path):
    """The real command with stderr redirected to a file, as a batch job would run it."""
    with open(tmp_path / "log", "w") as log:
        rc = subprocess.run(
            [sys.executable, "-m", "training.cli", "synth", str(tmp_path / "d"), "--classes", "2"]
            + ["--train-per-class", "2", "--val-per-class", "1", "--workers", "1"],
            cwd=REPO,
            stdout=log,
            stderr=log,
        ).returncode
    text = (tmp_path / "log").read_text()
    assert rc == 0 and "\r" not in text and "synth: 6/6 img (100%)" in text
