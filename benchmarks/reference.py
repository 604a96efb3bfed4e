"""The measured GPU reference files (benchmarks/reference/<card>_<YYYY-MM-DD>.json), the CPU records
(benchmarks/cpu/), and the README tables made from them.

    rn50 bench reference                      # print the Markdown made from every reference file
    rn50 bench reference --write README.md    # put it (and the per-instance table) between the README's markers
    rn50 bench reference --check README.md    # exit 1 if the README's tables differ from the files

(`python -m benchmarks.reference` is the same.) A reference file is what `scripts/gpu_check.sh` wrote on one GPU on
one day: the GPU, the CPU cores, the package versions, then what was measured. benchmarks.gpu_proof adds the dataset
and one keep-up row per (loader, source, resolution, compiled) with backend, source ("beton"/"folder"), res,
compiled, end_to_end_images_per_s, step_alone_images_per_s and ratio, and the sweeps of the DALI knobs; `rn50 bench
step --reference` adds one step row per (lever, resolution) with res, batch_size, precision, mode, images_per_s and
compile_s; `rn50 bench loader --cores ... --reference` adds `loader_cores` (settings, one row per loader, resolution
and count of logical CPUs with backend, source, res, cores, images_per_s). All write into the same file of the day
(`save`), each replacing only its own part. A CPU record (`rn50 bench loader --cores ... --record`, on a machine or a
run without a GPU) has the same shape with gpu null, is named after its CPU and lives in benchmarks/cpu/, never
among the GPU's files. Files are committed as measured and never edited by hand; the README's tables are
regenerated from them (the per-instance table by benchmarks.instances, from both folders), and the test suite fails
when they disagree.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
CPU_DIR = Path(__file__).resolve().parent / "cpu"  # CPU-only records (rn50 bench loader --cores --record)
README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- reference-tables:begin (made by: python -m benchmarks.reference --write README.md) -->"
END = "<!-- reference-tables:end -->"
# the per-instance table (benchmarks.instances), filled by the same command where a README has these markers
INSTANCE_BEGIN = "<!-- instance-table:begin (made by: python -m benchmarks.reference --write README.md) -->"
INSTANCE_END = "<!-- instance-table:end -->"
FORMAT = 1
TOP_KEYS = ("format", "date", "gpu", "cpu", "versions")
KEEPUP_KEYS = ("dataset", "settings")  # with keep-up rows
ROW_KEYS = ("backend", "source", "res", "compiled", "end_to_end_images_per_s", "step_alone_images_per_s", "ratio")
STEP_ROW_KEYS = ("res", "batch_size", "precision", "mode", "images_per_s", "compile_s")
LOADER_CORES_ROW_KEYS = ("backend", "source", "res", "cores", "images_per_s")
SOURCES = ("beton", "folder")
NOTHING_YET = (
    "No GPU measurement is committed yet: `bash scripts/gpu_check.sh` on a CUDA machine writes\n"
    "`benchmarks/reference/<card>_<date>.json`; commit it and run `python -m benchmarks.reference --write "
    "README.md`."
)


class ReferenceError(ValueError):
    pass


def validate(data: dict, where: str, need_gpu: bool = True) -> dict:
    """The file's content if it has every field the tables need; ReferenceError naming the file and field if not.
    need_gpu=False: a trial run on the CPU (never a reference file)."""
    missing = [k for k in TOP_KEYS if k not in data]
    if missing:
        raise ReferenceError(f"{where}: missing {', '.join(missing)}")
    if data["format"] != FORMAT:
        raise ReferenceError(f"{where}: format {data['format']}, this code reads {FORMAT}")
    if need_gpu and (not data["gpu"] or "name" not in data["gpu"]):
        raise ReferenceError(f"{where}: needs gpu.name (a reference is a GPU measurement)")
    if "cores" not in data["cpu"]:
        raise ReferenceError(f"{where}: needs cpu.cores")
    cores_rows = (data.get("loader_cores") or {}).get("rows")
    if not data.get("keepup") and not data.get("step") and not cores_rows:
        raise ReferenceError(f"{where}: has neither keepup nor step rows (nor loader_cores rows)")
    for i, row in enumerate(cores_rows or []):
        lacking = [k for k in LOADER_CORES_ROW_KEYS if k not in row]
        if lacking:
            raise ReferenceError(f"{where}: loader_cores row {i} lacks {', '.join(lacking)}")
    if data.get("keepup"):
        lacking = [k for k in KEEPUP_KEYS if k not in data]
        if lacking:
            raise ReferenceError(f"{where}: keepup rows without {', '.join(lacking)}")
    for i, row in enumerate(data.get("step") or []):
        lacking = [k for k in STEP_ROW_KEYS if k not in row]
        if lacking:
            raise ReferenceError(f"{where}: step row {i} lacks {', '.join(lacking)}")
    for i, row in enumerate(data.get("keepup") or []):
        lacking = [k for k in ROW_KEYS if k not in row]
        if lacking:
            raise ReferenceError(f"{where}: keepup row {i} lacks {', '.join(lacking)}")
        if row["source"] not in SOURCES:
            raise ReferenceError(f"{where}: keepup row {i}: source must be one of {SOURCES}, got {row['source']!r}")
        expected = row["end_to_end_images_per_s"] / row["step_alone_images_per_s"]
        if abs(expected - row["ratio"]) > 0.005:
            raise ReferenceError(
                f"{where}: keepup row {i}: ratio {row['ratio']} is not end to end / step alone ({expected:.3f})"
            )
    return data


def load_all(folder: Path = REFERENCE_DIR, need_gpu: bool = True) -> list[tuple[Path, dict]]:
    """Every file of `folder`, validated (need_gpu=False: the CPU records of CPU_DIR)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return [(p, validate(json.loads(p.read_text()), str(p), need_gpu)) for p in files]


def _num(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v < 10:
        return f"{v:.2f}"
    return f"{v:,.0f}"


def _rate(row: dict | None) -> str:
    """A --cores row's img/s with the cores its process kept busy."""
    if row is None:
        return "-"
    cores, busy = row.get("process_cores"), row.get("cpu_busy_pct")
    if cores is None:
        return _num(row["images_per_s"])
    return _num(row["images_per_s"]) + f" ({cores:.1f}" + ("" if busy is None else f", {busy:.0f}%") + ")"


def render_one(path: Path, data: dict) -> str:
    gpu, cpu = data["gpu"], data["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
    lines = [
        f"#### {gpu['name']}, {cpu['cores']} CPU cores, {data['date']} (`benchmarks/reference/{path.name}`)",
        "",
        f"{cpu.get('model', '?')}; {versions}.",
    ]
    if data.get("step"):
        lines += [
            "",
            "Train step alone (`rn50 bench step --levers ...`), synthetic batches on the GPU, median of timed "
            "windows; compile s = warm-up including compilation or graph capture:",
            "",
            "| lever | res | batch | precision | mode | SGD | img/s | vs compile | compile s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in data["step"]:
            vs = r.get("vs_compile")
            lines.append(
                f"| {r.get('lever', r['mode'])} | {r['res']} | {r['batch_size']} | {r['precision']} | "
                f"{r['mode']} | {r.get('sgd', '-')} | {_num(r['images_per_s'])} | "
                f"{'-' if vs is None else f'{vs:.2f}'} | {r['compile_s']:.0f}"
                f"{' (cache warm)' if r.get('compile_note') else ''} |"
            )
        if data.get("step_failed"):
            lines += ["", "Failed levers: " + "; ".join(data["step_failed"]) + "."]
    if data.get("keepup"):
        lines += ["", *keepup_lines(data)]
    if (data.get("loader_cores") or {}).get("rows"):
        lines += ["", *cores_lines(data["loader_cores"])]
    return "\n".join(lines)


def cores_lines(part: dict) -> list[str]:
    """`rn50 bench loader --cores` rows: one line per loader and resolution, one column per count of logical CPUs."""
    rows, s = part["rows"], part.get("settings") or {}
    counts = sorted({r["cores"] for r in rows})
    keys = sorted({(r["backend"], r["source"], r["res"]) for r in rows}, key=lambda k: (k[2], k[0], k[1]))
    at = {(r["backend"], r["source"], r["res"], r["cores"]): r for r in rows}
    lines = [
        f"Loader alone by logical CPUs (`rn50 bench loader --cores`; the process, its threads and workers confined to "
        f"that many; workers = {s.get('workers', '?')}), batch {s.get('batch_size', '?')}, {s.get('dtype', '?')}, "
        f"{s.get('passes', '?')}, median of passes 2+; in brackets the CPU cores the process kept busy (FFCV's and "
        f"DALI's threads run in it, torchvision's workers do not) and how busy the whole machine was (other programs "
        f"included). Data: {s.get('data', '?')}.",
        "",
        "| loader | source | res | "
        + " | ".join(f"{n} CPU{'s' if n > 1 else ''}: img/s (cores)" for n in counts)
        + " |",
        "|---|---|---|" + "---|" * len(counts),
    ]
    for k in keys:
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(_rate(at.get((*k, n))) for n in counts) + " |")
    if part.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(part["skipped"]) + "."]
    return lines


def keepup_lines(data: dict) -> list[str]:
    s = data["settings"]
    lines = [
        f"Data: {data['dataset'].get('description', '?')}. "
        f"{s.get('arch', 'resnet50')}, batch {s.get('batch_size', '?')}, {s.get('precision', '?')}, "
        f"channels_last; each row one window of {s.get('window_batches', '?')} batches inside one epoch, after "
        f"{s.get('warmup_batches', '?')} warm-up batches.",
        "",
        "| loader | source | res | step | loader alone img/s | end to end img/s | step alone img/s | ratio "
        "| data wait | process cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["keepup"]:
        wait = r.get("data_wait_share")
        lines.append(
            f"| {r['backend']}{' (feed thread)' if r.get('feed_thread') else ''} | {r['source']} | {r['res']} | "
            f"{'compiled' if r['compiled'] else 'eager'} | "
            f"{_num(r.get('loader_alone_images_per_s'))} | {_num(r['end_to_end_images_per_s'])} | "
            f"{_num(r['step_alone_images_per_s'])} | {r['ratio']:.2f} | "
            f"{'-' if wait is None else f'{100 * wait:.0f}%'} | {_num(r.get('process_cores'))} |"
        )
    for name, rows in (data.get("sweeps") or {}).items():
        if not rows:
            continue
        first = rows[0]
        lines += [
            "",
            f"Sweep of {name} ({first.get('what', 'DALI from the beton, loader alone')}):",
            "",
            f"| {name} | img/s | process cores | other knobs |",
            "|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['value']} | {_num(r['images_per_s'])} | {_num(r.get('process_cores'))} | {r.get('knobs', '')} |"
            )
    extras = data.get("extras") or []
    if extras:
        lines += ["", "Also measured:", ""]
        lines += [
            f"- {e['what']}: {_num(e['images_per_s'])} img/s, {_num(e.get('process_cores'))} process cores"
            for e in extras
        ]
    if data.get("skipped"):
        lines += ["", "Skipped or failed: " + "; ".join(data["skipped"]) + "."]
    return lines


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def save(
    info: dict, out_dir: Path = REFERENCE_DIR, driver: str | None = None, name: str | None = None, **parts
) -> Path:
    """Write `parts` (keepup + dataset + settings + sweeps ..., step, or loader_cores) into today's file for this GPU
    (<card>_<date>.json; `name` instead of the card for a CPU record), keeping what another benchmark wrote there
    today. info: benchmarks.report.machine_info()."""
    gpu = info["gpu"]
    date = time.strftime("%Y-%m-%d")
    path = Path(out_dir) / f"{name or (card_slug(gpu['name']) if gpu else 'cpu')}_{date}.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(
        {
            "format": FORMAT,
            "date": date,
            "gpu": gpu and {**gpu, "driver": driver},
            "cpu": {"model": info["cpu"], "cores": info["cores"], "ram_gib": info["ram_gib"]},
            "versions": info["versions"],
            "python": info["python"],
        }
    )
    data.update(parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def render(folder: Path = REFERENCE_DIR) -> str:
    refs = load_all(folder)
    if not refs:
        return NOTHING_YET
    return "\n\n".join(render_one(p, d) for p, d in refs)


def readme_region(text: str, where: str = "README.md", begin: str = BEGIN, end: str = END) -> tuple[int, int]:
    """(start, end) of the text between the markers."""
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ReferenceError(f"{where}: needs exactly one {begin!r} ... {end!r} region")
    return text.index(begin) + len(begin), text.index(end)


def fill(text: str, tables: str, where: str = "README.md", begin: str = BEGIN, end: str = END) -> str:
    start, stop = readme_region(text, where, begin, end)
    return text[:start] + "\n" + tables + "\n" + text[stop:]


def instance_table(folder: Path = REFERENCE_DIR, cpu_folder: Path = CPU_DIR) -> str:
    """The README's per-instance table (benchmarks.instances over the reference files and the CPU records), then
    each CPU record's own rows."""
    from benchmarks import instances

    cpu = load_all(cpu_folder, need_gpu=False)
    text = instances.table(list(instances.INSTANCES), load_all(folder), cpu)
    for path, data in cpu:
        versions = ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
        text += (
            f"\n\n#### {data['cpu']['model']}, {data['cpu']['cores']} logical CPUs, no GPU, {data['date']} "
            f"(`benchmarks/{cpu_folder.name}/{path.name}`)\n\n{versions}.\n\n"
            + "\n".join(cores_lines(data["loader_cores"]))
        )
    return text


def fill_all(text: str, folder: Path, cpu_folder: Path, where: str = "README.md") -> str:
    """The GPU tables between BEGIN and END, and the per-instance table where the text has its markers."""
    text = fill(text, render(folder), where)
    if INSTANCE_BEGIN in text or INSTANCE_END in text:
        text = fill(text, instance_table(folder, cpu_folder), where, INSTANCE_BEGIN, INSTANCE_END)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rn50 bench reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(REFERENCE_DIR), help="folder of reference files (benchmarks/reference)")
    p.add_argument("--cpu-dir", default=str(CPU_DIR), help="folder of CPU records (benchmarks/cpu)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", help="put the tables between the markers of this file")
    group.add_argument("--check", metavar="README", help="exit 1 if this file's tables differ from the files")
    args = p.parse_args(argv)
    try:
        tables = render(Path(args.dir))
        if args.write or args.check:
            path = Path(args.write or args.check)
            text = path.read_text()
            updated = fill_all(text, Path(args.dir), Path(args.cpu_dir), str(path))
            if args.check:
                if updated != text:
                    print(
                        f"{path}: the reference tables differ from {args.dir} and {args.cpu_dir}; run "
                        f"rn50 bench reference --write {path}",
                        file=sys.stderr,
                    )
                    return 1
                return 0
            path.write_text(updated)
            print(f"wrote the reference tables into {path}")
            return 0
    except (ReferenceError, json.JSONDecodeError, OSError) as e:
        print(f"benchmarks.reference: error: {e}", file=sys.stderr)
        return 2
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
