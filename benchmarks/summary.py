"""`python -m benchmarks.summary DIR`: one Markdown table (DIR/summary.md, also printed) from the step, loader, keepup
and convert JSON files under DIR, as `rn50 bench` writes them. Rows: the train step alone (eager or compiled), each
loader alone, each loader feeding the step with its keep-up ratio, and the converters."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.report import describe_machine, markdown_table


def rows_from(path: Path, data: dict) -> list[list]:
    kind = path.stem
    rows = []
    if kind == "step":
        for r in data["results"]:
            mode = "compiled" if r["compile"] else "eager"
            rows.append(
                [
                    f"train step alone, {mode}",
                    r["res"],
                    r["precision"],
                    r["images_per_s"],
                    "",
                    f"warm-up {r['warmup_s']:.0f} s",
                ]
            )
    elif kind == "loader":
        for r in data["rows"]:
            rows.append(
                [
                    f"loader {r['backend']}",
                    r["resolution"],
                    data["settings"].get("dtype", ""),
                    r["img_s"],
                    "",
                    f"first epoch {r['first_epoch_img_s']:,.0f} img/s, CPU "
                    + ("too short to measure" if r["cpu_busy_pct"] is None else f"{r['cpu_busy_pct']:.0f}%"),
                ]
            )
    elif kind == "keepup":
        for r in data["results"]:
            mode = "compiled" if r["compile"] else "eager"
            rows.append(
                [
                    f"{r['backend']} feeding the {mode} step",
                    r["res"],
                    r["precision"],
                    r["end_to_end_images_per_s"],
                    f"{r['ratio']:.2f}",
                    f"{r['verdict']}; step alone {r['step_alone_images_per_s']:,.0f}",
                ]
            )
    elif kind == "convert":
        for name, w in data["writers"].items():
            rows.append(
                [
                    f"conversion: {name}",
                    data["max_res"],
                    "",
                    w["median_images_per_s"],
                    "",
                    f"{w['median_cpu_ms_per_image']:.2f} CPU-ms/img",
                ]
            )
    return rows


def summarize(root: Path) -> str:
    files = sorted(p for p in root.rglob("*.json") if p.stem in ("step", "loader", "keepup", "convert"))
    if not files:
        raise FileNotFoundError(f"{root}: no step/loader/keepup/convert .json files")
    rows, machine = [], None
    for f in files:
        data = json.loads(f.read_text())
        machine = machine or data.get("machine")
        rows += rows_from(f, data)
    head = describe_machine(machine) if machine else "unknown machine"
    return (
        f"# GPU check\n\n{head}\n\n"
        + markdown_table(["what", "res", "precision", "img/s", "keep-up ratio", "notes"], rows)
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.summary DIR", file=sys.stderr)
        return 2
    try:
        text = summarize(Path(argv[0]))
    except FileNotFoundError as e:
        print(f"benchmarks.summary: error: {e}", file=sys.stderr)
        return 2
    (Path(argv[0]) / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
