"""What every benchmark writes: the machine it ran on, JSON, a Markdown table and a PNG chart.

A number without its hardware is not a result, so `machine_info()` goes into every JSON and heads every table.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_info() -> dict | None:
    """Name, memory and driver of GPU 0, or None (imports torch only if it is already importable cheaply)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "count": torch.cuda.device_count(),
        "capability": f"{props.major}.{props.minor}",
        "cuda": torch.version.cuda,
    }


def driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    """Installed distribution versions (ffcv's own __version__ attribute is stale, so ask the installer's record)."""
    from importlib import metadata

    names = {
        "torch": ["torch"],
        "torchvision": ["torchvision"],
        "ffcv": ["ffcv"],
        "numba": ["numba"],
        "dali": ["nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110"],
        "numpy": ["numpy"],
        "pillow": ["pillow"],
    }
    found: dict[str, str | None] = {}
    for key, dists in names.items():
        found[key] = None
        for dist in dists:
            try:
                found[key] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found


def machine_info() -> dict:
    versions = package_versions()
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    gpu = gpu_info()
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "ram_gib": mem,
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def describe_machine(info: dict) -> str:
    gpu = info["gpu"]["name"] if info.get("gpu") else "no GPU"
    return f"{info['cpu']}, {info['cores']} cores, {info.get('ram_gib')} GiB RAM, {gpu}"


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def out_problem(prog: str, out_dir: str | Path | None) -> str | None:
    """The one-line error for a results folder that cannot be written, checked before minutes of measuring."""
    from dataset_tools.files import check_writable

    out = Path(out_dir) if out_dir else DEFAULT_OUT
    try:
        check_writable(out / "results.json")
    except OSError as e:
        return f"{prog}: error: --out {out}: cannot write there ({e.strerror or e}); choose another folder"
    return None


def write_results(
    name: str, data: dict, markdown: str, chart: Callable[[Path], None] | None, out_dir: str | Path | None = None
) -> dict[str, Path]:
    """Write NAME.json, NAME.md and (if `chart`) NAME.png into `out_dir` (default benchmarks/results/)."""
    out = Path(out_dir) if out_dir else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    if chart is not None:
        try:
            import matplotlib
        except ImportError:  # a bare GPU image may lack it: the numbers matter more than the picture
            print(f"note: matplotlib is not installed, so no {name}.png", file=sys.stderr)
            return paths
        matplotlib.use("Agg")
        paths["png"] = out / f"{name}.png"
        chart(paths["png"])
    return paths


def bar_chart(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    title: str,
    ylabel: str,
    reference: float | None = None,
    reference_label: str = "",
) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(labels) + 2), 3.6))
    bars = ax.bar(range(len(values)), values, color=["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"])
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    for b, v in zip(bars, values):
        ax.annotate(f"{v:,.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="k", ls="--", lw=1)
        ax.annotate(reference_label, (len(values) - 0.5, reference), ha="right", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_failure(prog: str, what: str, e: BaseException) -> str:
    """Print `what` failed with its full traceback (chained causes included) to stderr; return the one-line chain
    for a results file's list of what was skipped."""
    import traceback

    from pipeline.contract import error_chain

    print(f"{prog}: {what} failed:", file=sys.stderr)
    traceback.print_exception(e, file=sys.stderr)
    sys.stderr.flush()
    return f"{what} ({error_chain(e)})"
