"""Run `rn50 train` in this process and kill it (SIGKILL, or another signal) at an exact moment of the run.

    python tests/_resume_runner.py '{"event": "step", "n": 4, "signal": "KILL"}' -- <rn50 train flags>
    torchrun --nproc_per_node 2 --max-restarts 2 tests/_resume_runner.py '[{"rank": 1, "attempt": 0, ...}, ...]' -- ...

Under torchrun the spec may be a list: the first entry whose "rank", "attempt" (torchrun's restart count) or
"from_attempt" match this process applies, unless its "once" file exists (it is created at the kill); a process no
entry matches runs without a kill.

Events (counted from the start of this process; the signal is sent to the process itself, so the moment is exact
and the test reproducible):
- step:   after the n-th optimizer step returned, before the trainer saw it (work done, nothing saved yet)
- val:    before the n-th validation batch is evaluated
- write:  in the middle of the n-th checkpoint write: half of the bytes are in the temporary file, then the signal
          (use it with KILL: after another signal the write would go on and leave a temp file of garbage)
- epoch_end: right after the n-th end-of-epoch checkpoint files are written (between two epochs)
- none:   no kill (an uninterrupted run)
Every optimizer step prints "STEP <n>" so a parent can also watch the run. The process's exit code is the run's.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # kill -USR1 <pid> prints where a hung run is stuck
    spec = json.loads(sys.argv[1])
    if isinstance(spec, list):
        rank, attempt = int(os.environ.get("RANK", 0)), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        spec = next(
            (
                s
                for s in spec
                if s.get("rank", rank) == rank
                and s.get("attempt", attempt) == attempt
                and attempt >= s.get("from_attempt", 0)
                and not Path(s.get("once", "/nonexistent")).exists()
            ),
            {},
        )
    argv = sys.argv[sys.argv.index("--") + 1 :]
    event, n = spec.get("event", "none"), int(spec.get("n", 0))
    signum = getattr(signal, "SIG" + spec.get("signal", "KILL"))

    import torch

    from training import checkpoint, trainer

    counts = {"step": 0, "val": 0, "write": 0, "epoch_end": 0}

    def hit(name: str) -> None:
        counts[name] += 1
        if name == event and counts[name] == n:
            if "once" in spec:
                Path(spec["once"]).touch()
            sys.stdout.flush()
            os.kill(os.getpid(), signum)

    train_step = trainer.train_step  # the epoch loop's step (training.engine.train_step)

    def counted_step(*args, **kwargs):
        out = train_step(*args, **kwargs)
        print(f"STEP {counts['step'] + 1}", flush=True)
        hit("step")
        return out

    trainer.train_step = counted_step

    evaluate = trainer.evaluate

    def counted_evaluate(*args, should_stop=None, **kwargs):
        def poll() -> bool:
            hit("val")
            return should_stop() if should_stop is not None else False

        return evaluate(*args, should_stop=poll, **kwargs)

    trainer.evaluate = counted_evaluate

    save = torch.save

    def slow_save(obj, f, *args, **kwargs):
        if event == "write" and counts["write"] + 1 == n and hasattr(f, "write"):
            buf = io.BytesIO()
            save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        counts_before = counts["write"]
        hit("write")  # does not return when this is the write to kill
        assert counts["write"] == counts_before + 1
        return save(obj, f, *args, **kwargs)

    torch.save = slow_save

    save_checkpoint = checkpoint.save_checkpoint

    def counted_save_checkpoint(*args, **kwargs):
        out = save_checkpoint(*args, **kwargs)
        hit("epoch_end")
        return out

    checkpoint.save_checkpoint = counted_save_checkpoint

    from training.train import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
