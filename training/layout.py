"""Where a run's files live under --output-dir. No torch here: the command line checks them before importing it.

<output_dir>/checkpoints/<run>/   checkpoint.pt (the latest state), model_XXX.pt, best.pt, config.yaml
<output_dir>/logs/<run>/          training_log.md/.json, config.yaml, loss/accuracy/lr .png
<output_dir>/runs/<run>/          TensorBoard events
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LATEST = "checkpoint.pt"
BEST = "best.pt"
CONFIG = "config.yaml"


@dataclass(frozen=True)
class RunPaths:
    output_dir: Path
    run: str

    def __init__(self, output_dir: str | Path, run: str) -> None:
        object.__setattr__(self, "output_dir", Path(output_dir))
        object.__setattr__(self, "run", run)

    @property
    def checkpoints(self) -> Path:
        return self.output_dir / "checkpoints" / self.run

    @property
    def logs(self) -> Path:
        return self.output_dir / "logs" / self.run

    @property
    def events(self) -> Path:
        return self.output_dir / "runs" / self.run

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def config(self) -> Path:
        """The resolved config saved beside the checkpoints (read by --resume)."""
        return self.checkpoints / CONFIG
