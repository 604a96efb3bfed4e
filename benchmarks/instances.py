"""Does the loader keep up on the instance I am about to rent? An answer per EC2 instance the README's recipes name,
from what this project measured and what is published, each figure with its kind and source.

    rn50 doctor --instance g4dn.2xlarge          # one instance
    rn50 doctor --instance all                   # every one (the README's table: python -m benchmarks.reference)

Per instance and resolution (160/192/224 px):
- vCPUs per GPU, from the instance's published shape (AWS's instance type pages);
- the GPU's ResNet-50 training rate: measured by this project where it has measured that card (the reference files'
  compiled step; the H100's eager step from the README), published where it has not (named), otherwise scaled by
  pixel count from the nearest resolution that has a figure -- labelled an estimate, never a measurement;
- the ffcv backend's loader rate at that many logical CPUs: `rn50 bench loader --cores` rows (GPU reference files,
  and CPU records in benchmarks/cpu/) and the proof's loader-alone rows, at the exact count where one was measured,
  else at the nearest count, scaled linearly to the instance's count and labelled an estimate; the CPU model beside
  every measured figure;
- the verdict: the loader alone reaches the GPU's rate, or falls short by x% (then: GPU decoding with an all-JPEG
  beton, fewer GPUs per node, or a lower resolution), and whether the GPU has a hardware JPEG decoder.

Every loader figure so far comes from `rn50 synth` images, which compress far better than photographs: on real
photographs the CPU ranking of the backends differs (issue 18: one all-JPEG beton of real photos at 160 px on 2
threads gave the ffcv backend 1.39x a plain FFCV Loader and DALI's CPU pipeline 0.94x the ffcv backend). They say what
a loader does with these images at that many CPUs, not what it will do with ImageNet.

This module only computes: the files are read by benchmarks.reference (load_all) and handed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RESOLUTIONS = (160, 192, 224)
KINDS = ("measured", "published", "derived", "estimate")  # derived: arithmetic on a published figure, no scaling


@dataclass(frozen=True)
class Figure:
    low: float
    high: float
    kind: str  # one of KINDS
    source: str
    note: str = ""  # shown beside the figure in the table (where a loader rate was measured: CPUs and CPU model)

    @property
    def text(self) -> str:
        return _range(self.low, self.high)


@dataclass(frozen=True)
class Gpu:
    name: str
    card: str  # how reference files name it (a substring of gpu.name), for figures this project measured
    hw_jpeg: bool  # a hardware JPEG decoder (nvJPEG's A100/H100/H200 engine) besides the SMs
    published: dict[int, Figure] = field(default_factory=dict)  # training img/s per GPU, by resolution


@dataclass(frozen=True)
class Instance:
    name: str
    vcpus: int
    gpus: int
    gpu: str  # a key of GPUS
    recipe: str


DLE = "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README, AMP, batch 256, one {card} (the README's anchors)"
GPUS = {
    "A100": Gpu(
        "A100 40GB",
        "A100",
        True,
        {
            160: Figure(
                3500,
                3500,
                "derived",
                "ffcv-imagenet's published logs, ResNet-50 on 8x A100 at 160 px, "
                "loader-fed: about 3,500 img/s per GPU (derived, the README's anchors)",
            ),
            224: Figure(2470, 2470, "published", DLE.format(card="A100 80GB; the p4d's A100 has 40 GB")),
        },
    ),
    "H100": Gpu(
        "H100 80GB",
        "H100",
        True,
        {
            160: Figure(
                7180,
                7180,
                "measured",
                "this project, one H100 80GB HBM3 with a 16-core Xeon, eager step, "
                "bf16, batch 256 (README, the first gpu_check run; the compiled step has not run on an H100)",
                "eager step",
            ),
            224: Figure(
                7010,
                7160,
                "published",
                "MLPerf Training v3.0/v4.0 ResNet-50, 8x H100, MXNet + DALI, per "
                "GPU (MLCommons results; the README's anchors): a hand-tuned ceiling",
            ),
        },
    ),
    "A10G": Gpu("A10G", "A10G", False),
    "V100": Gpu("V100 16GB", "V100", False, {224: Figure(1200, 1200, "published", DLE.format(card="V100 16GB"))}),
    "T4": Gpu(
        "T4",
        "T4",
        False,
        {
            224: Figure(
                265,
                265,
                "derived",
                "the reference README's single-T4 run: 75.27 % top-1 in 50 epochs in "
                "about 67 hours, so about 265 img/s end to end, validation included (NVIDIA publishes no T4 "
                "training figure)",
            ),
        },
    ),
}

# vCPUs and GPUs of each instance, from AWS's instance type pages: aws.amazon.com/ec2/instance-types/p4/ (p4d.24xlarge:
# 96 vCPUs, 8x A100 40 GB), /p5/ (p5.48xlarge: 192 vCPUs, 8x H100 80 GB), /g5/ (g5.12xlarge: 48 vCPUs, 4x A10G),
# /p3/ (p3.8xlarge: 32 vCPUs, 4x V100 16 GB), /g4/ (g4dn.2xlarge: 8 vCPUs, 1x T4). The recipes are the README's
# "EC2 setup" section's.
INSTANCES = {
    i.name: i
    for i in (
        Instance("p4d.24xlarge", 96, 8, "A100", "scripts/train_8gpu.sh"),
        Instance("p5.48xlarge", 192, 8, "H100", "scripts/train_8gpu.sh"),
        Instance("g5.12xlarge", 48, 4, "A10G", "NGPU=4 scripts/train_8gpu.sh"),
        Instance("p3.8xlarge", 32, 4, "V100", "NGPU=4 scripts/train_8gpu.sh"),
        Instance("g4dn.2xlarge", 8, 1, "T4", "scripts/train_t4_budget.sh"),
    )
}


def _range(low: float, high: float) -> str:
    return f"{low:,.0f}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}"


def _where(path: Path, data: dict) -> str:
    gpu = (data.get("gpu") or {}).get("name")
    return f"{f'the {gpu} machine' if gpu else 'a CPU-only machine'}, `benchmarks/{path.parent.name}/{path.name}`"


def measured_step(refs: list[tuple[Path, dict]], card: str, res: int) -> Figure | None:
    """The compiled train step alone on `card` at `res`, from the reference files (keep-up rows' step alone and
    `rn50 bench step` compile rows): the range over every file, or None."""
    values, files = [], []
    for path, data in refs:
        if card.lower() not in data["gpu"]["name"].lower():
            continue
        found = [r["step_alone_images_per_s"] for r in data.get("keepup") or [] if r["res"] == res and r["compiled"]]
        found += [r["images_per_s"] for r in data.get("step") or [] if r["res"] == res and r["mode"] == "compile"]
        if found:
            values += found
            files.append(path.name)
    if not values:
        return None
    gpu = next(d["gpu"]["name"] for _, d in refs if card.lower() in d["gpu"]["name"].lower())
    return Figure(
        min(values),
        max(values),
        "measured",
        f"this project, one {gpu}, compiled step alone, bf16, batch 256 ({', '.join(files)})",
        "compiled step",
    )


def gpu_rate(gpu: Gpu, res: int, refs: list[tuple[Path, dict]]) -> Figure | None:
    """Measured, else published (or derived from published), else scaled by pixel count from the nearest resolution
    with such a figure (an estimate; ties: a measurement first, then the higher resolution)."""
    known = {}
    for r in RESOLUTIONS:
        known[r] = measured_step(refs, gpu.card, r) or gpu.published.get(r)
    if known[res] is not None:
        return known[res]
    have = [r for r in RESOLUTIONS if known[r] is not None]
    if not have:
        return None
    base = min(have, key=lambda r: (abs(r - res), known[r].kind != "measured", -r))
    f, scale = known[base], (base / res) ** 2
    return Figure(
        f.low * scale,
        f.high * scale,
        "estimate",
        f"{f.text} at {base} px ({f.kind}) x ({base}/{res})^2, the pixel count: an estimate",
        f"from {base} px",
    )


@dataclass
class LoaderRate:
    cores: int
    low: float
    high: float
    cpu: str
    source: str


def loader_rates(refs: list[tuple[Path, dict]], cpu_records: list[tuple[Path, dict]], res: int) -> list[LoaderRate]:
    """The ffcv backend alone at `res` from a beton, one entry per (file, count of logical CPUs): `rn50 bench loader
    --cores` rows of reference files and CPU records, and the proof's loader-alone rows (the machine's cores)."""
    found = []
    for path, data in [*refs, *cpu_records]:
        by_count: dict[int, list[float]] = {}
        for r in (data.get("loader_cores") or {}).get("rows") or []:
            if r["backend"] == "ffcv" and r["source"] == "beton" and r["res"] == res and r["images_per_s"]:
                by_count.setdefault(r["cores"], []).append(r["images_per_s"])
        for r in data.get("keepup") or []:
            rate = r.get("loader_alone_images_per_s")
            if r["backend"] == "ffcv" and r["source"] == "beton" and r["res"] == res and rate:
                by_count.setdefault(data["cpu"]["cores"], []).append(rate)
        for n, rates in by_count.items():
            found.append(LoaderRate(n, min(rates), max(rates), data["cpu"].get("model", "?"), _where(path, data)))
    return found


def loader_at(vcpus: int, rates: list[LoaderRate]) -> tuple[Figure, LoaderRate] | None:
    """The ffcv rate at `vcpus` logical CPUs: measured there (every measurement at that count, as a range), else the
    nearest count's (ties: the larger) scaled linearly to `vcpus` -- an estimate."""
    if not rates:
        return None
    nearest = min(rates, key=lambda r: (abs(r.cores - vcpus), -r.cores))
    same = [r for r in rates if r.cores == nearest.cores]
    low, high = min(r.low for r in same), max(r.high for r in same)
    cpus = ", ".join(sorted({r.cpu for r in same}))
    where = "; ".join(sorted({r.source for r in same}))
    note = f"{nearest.cores} CPUs of {cpus}"
    if nearest.cores == vcpus:
        return Figure(low, high, "measured", f"measured at {vcpus} logical CPUs ({cpus}): {where}", note), nearest
    scale = vcpus / nearest.cores
    return (
        Figure(
            low * scale,
            high * scale,
            "estimate",
            f"{_range(low, high)} measured at {nearest.cores} logical CPUs ({cpus}; the nearest count measured) x "
            f"{vcpus}/{nearest.cores}, linear in CPUs: an estimate ({where})",
            f"from {note}",
        ),
        nearest,
    )


def verdict(loader: Figure | None, need: Figure | None, gpu: Gpu) -> str:
    if loader is None or need is None:
        missing = "no loader rate at this resolution" if loader is None else f"no training rate for the {gpu.name}"
        return f"unknown: {missing}"
    worst, best = loader.low / need.high, loader.high / need.low
    kind = "" if loader.kind == need.kind == "measured" else " (estimate)"
    if worst >= 1:
        return f"keeps up{kind}: {worst:.1f}x" + (f"–{best:.1f}x" if round(best, 1) != round(worst, 1) else "")
    fix = (
        "then: DALI decoding on the GPU from an all-JPEG beton (hardware decoder), fewer GPUs per node, or a lower res"
        if gpu.hw_jpeg
        else "then: DALI with nvJPEG on the SMs (competes with the step), fewer GPUs per node, or a lower res"
    )
    if best < 1:
        short = _range(100 * (1 - best), 100 * (1 - worst))
        return f"falls short by {short}%{kind}; {fix}"
    return f"at the edge{kind}: {100 * (1 - worst):.0f}% short to {100 * (best - 1):.0f}% spare; {fix}"


def decoding(gpu: Gpu) -> str:
    if gpu.hw_jpeg:
        return "yes: hardware JPEG decoder (DALI, all-JPEG beton)"
    return "nvJPEG on the SMs only: competes with the step"


def answer(name: str, refs: list[tuple[Path, dict]], cpu_records: list[tuple[Path, dict]]) -> list[dict]:
    """One dict per resolution for instance `name`: vcpus_per_gpu, gpu_rate, loader (Figures or None), verdict."""
    inst = INSTANCES[name]
    gpu = GPUS[inst.gpu]
    per_gpu = inst.vcpus // inst.gpus
    rows = []
    for res in RESOLUTIONS:
        need = gpu_rate(gpu, res, refs)
        found = loader_at(per_gpu, loader_rates(refs, cpu_records, res))
        loader = found[0] if found else None
        rows.append(
            {
                "instance": inst,
                "gpu": gpu,
                "vcpus_per_gpu": per_gpu,
                "res": res,
                "gpu_rate": need,
                "loader": loader,
                "verdict": verdict(loader, need, gpu),
                "decoding": decoding(gpu),
            }
        )
    return rows


class Sources:
    """Numbered sources in order of first use: a cell says [n], the legend says what n is."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> int:
        if text not in self.texts:
            self.texts.append(text)
        return self.texts.index(text) + 1

    def legend(self) -> list[str]:
        return [f"[{i}] {t}" for i, t in enumerate(self.texts, 1)]


def _cell(f: Figure | None, sources: Sources, missing: str) -> str:
    if f is None:
        return missing
    note = f", {f.note}" if f.note else ""
    return f"{'≈' if f.kind == 'estimate' else ''}{f.text} ({f.kind}{note} [{sources.ref(f.source)}])"


def h200_note(refs: list[tuple[Path, dict]]) -> str | None:
    """What this project measured on an H200 at 160 px (for the Hopper instances), from the reference files."""
    step = measured_step(refs, "H200", 160)
    if step is None:
        return None
    h200 = [d for _, d in refs if "h200" in d["gpu"]["name"].lower()]
    graphed = [
        r["images_per_s"] for d in h200 for r in d.get("step") or [] if r["res"] == 160 and r["mode"] == "graphs"
    ]
    text = (
        f"On one NVIDIA H200 (16-core Xeon) this project measured at 160 px: the compiled step alone {step.text} img/s"
    )
    if graphed:
        text += f", the CUDA-graph step {_range(min(graphed), max(graphed))}"
    for backend in ("dali", "ffcv"):
        fed = [
            r["end_to_end_images_per_s"]
            for d in h200
            for r in d.get("keepup") or []
            if r["backend"] == backend and r["source"] == "beton" and r["res"] == 160 and r["compiled"]
        ]
        if fed:
            text += (
                f"; {backend} from a beton of generated images feeding the compiled step {_range(min(fed), max(fed))}"
            )
    return text + " (benchmarks/reference/)."


def table(names: list[str], refs: list[tuple[Path, dict]], cpu_records: list[tuple[Path, dict]]) -> str:
    """The Markdown table of `names` (rows per instance and resolution), its legend and notes."""
    sources = Sources()
    lines = [
        "| instance | GPUs | vCPUs per GPU | res | GPU training img/s | ffcv backend alone, img/s at vCPUs per GPU | "
        "verdict | GPU JPEG decoding |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        for row in answer(name, refs, cpu_records):
            inst, gpu = row["instance"], row["gpu"]
            lines.append(
                f"| {inst.name} | {inst.gpus}x {gpu.name} | {inst.vcpus}/{inst.gpus} = {row['vcpus_per_gpu']} | "
                f"{row['res']} | {_cell(row['gpu_rate'], sources, 'no published figure')} | "
                f"{_cell(row['loader'], sources, 'not measured')} | {row['verdict']} | {row['decoding']} |"
            )
    notes = [
        "",
        "Sources:",
        "",
        *(f"- {line}" for line in sources.legend()),
        "",
        "Read it with care:",
        "",
        "- Every loader figure is from generated `rn50 synth` images, which compress far better than photographs; on "
        "real photographs the CPU ranking of the backends differs (one all-JPEG beton of real photos at 160 px on 2 "
        "threads gave the ffcv backend 1.39x a plain FFCV Loader and DALI's CPU pipeline 0.94x the ffcv backend). Do "
        "not carry them over to ImageNet: measure on the instance (`rn50 bench loader --cores N`, `rn50 bench keepup`).",
        "- The verdict compares the loader alone with the GPU's training rate: reaching it is necessary, not "
        "sufficient (the loader and the training process share the CPUs).",
        "- Estimates scale linearly in CPUs and by pixel count; neither is measured.",
    ]
    h200 = h200_note(refs)
    if h200:
        notes.append(f"- {h200}")
    return "\n".join(lines + notes)


def report(name: str, refs: list[tuple[Path, dict]], cpu_records: list[tuple[Path, dict]]) -> str:
    """`rn50 doctor --instance NAME` (or all): the shape, the recipe and the table."""
    names = list(INSTANCES) if name == "all" else [name]
    head = [
        f"{n}: {INSTANCES[n].vcpus} vCPUs, {INSTANCES[n].gpus}x {GPUS[INSTANCES[n].gpu].name} (AWS's instance type "
        f"page); recipe: {INSTANCES[n].recipe}"
        for n in names
    ]
    return "\n".join(head) + "\n\n" + table(names, refs, cpu_records)
