"""`rn50 doctor`: what this machine has, whether the dataset fits its memory, and the loader settings to use.

    rn50 doctor                                  # machine and software only
    rn50 doctor --data-dir /data/betons          # + dataset size vs RAM, quick loader (and GPU step) probes
    rn50 doctor --data-dir /data/imagenet --no-probe --json doctor.json
    rn50 doctor --instance g4dn.2xlarge          # does the loader keep up on this EC2 instance? (or: all)

The probes are short (seconds): a few batches from the loader `--loader auto` would pick, and, on a GPU, a few train
steps plus a memory measurement that says which batch size fits. Recommendations are rules of thumb from FFCV's and
DALI's documentation and this project's benchmarks; `rn50 bench keepup` gives the definitive answer. `--instance`
answers for an EC2 instance the README's recipes name, from what this project measured (benchmarks/reference/,
benchmarks/cpu/) and what is published, each figure labelled measured, published, derived or estimate with its source
(benchmarks.instances).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from benchmarks.report import driver_version, machine_info
from benchmarks.timing import measure

GIB = 2**30
# Published FFCV dataset sizes for full ImageNet train (ffcv docs, benchmarks.rst), to suggest what fits in RAM.
FFCV_SIZES_GB = {"max-res 512, all JPEG q90": 65.47, "max-res 256, all raw": 169.79, "max-res 512, half JPEG": 202.04}


def memory() -> dict:
    import psutil

    vm = psutil.virtual_memory()
    return {"total_gib": vm.total / GIB, "available_gib": vm.available / GIB}


def dataset_facts(data_dir: Path) -> dict:
    """Layout, sizes and counts. Image folders are sized by sampling up to 20 class folders (a full walk of 1.28 M
    files takes minutes on network disks)."""
    from dataset_tools.beton_format import BetonFormatError
    from dataset_tools.files import DataFolderError
    from pipeline.folders import has_beton, has_folder

    facts: dict = {"path": str(data_dir), "betons": {}, "folders": {}}
    for split in ("train", "val"):
        if has_beton(data_dir, split):
            try:
                storage = beton_storage(data_dir / f"{split}.beton")
            except (BetonFormatError, DataFolderError, OSError) as e:  # empty, truncated, damaged index
                facts.setdefault("unreadable", {})[split] = str(e)
            else:
                facts["betons"][split] = (data_dir / f"{split}.beton").stat().st_size
                facts.setdefault("storage", {})[split] = storage
                facts.setdefault("checksums", {})[split] = checksum_state(data_dir / f"{split}.beton")
        if has_folder(data_dir, split):
            classes = sorted(p for p in (data_dir / split).iterdir() if p.is_dir() and not p.name.startswith("."))
            step = max(1, len(classes) // 20)
            sample = classes[::step][:20]
            files = [f for c in sample for f in c.iterdir() if f.is_file()]
            per_class = len(files) / max(1, len(sample))
            mean_bytes = sum(f.stat().st_size for f in files) / max(1, len(files))
            facts["folders"][split] = {
                "classes": len(classes),
                "images_estimate": int(per_class * len(classes)),
                "bytes_estimate": int(per_class * len(classes) * mean_bytes),
            }
    report = data_dir / "convert_report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        facts["skipped_at_conversion"] = {s: len(r[s]["skipped"]) for s in ("train", "val") if s in r}
    usage = shutil.disk_usage(data_dir)
    facts["disk_free_gib"] = usage.free / GIB
    return facts


def checksum_state(path: Path) -> dict:
    """A spot check of the beton's per-sample checksums (dataset_tools.checksums), or why there is none."""
    from dataset_tools.checksums import spot_check

    try:
        return spot_check(path)
    except Exception as e:  # a damaged index: the loaders and rn50 inspect name it; the doctor only reports
        return {"state": "unusable", "checked": 0, "bad": [], "note": f"{type(e).__name__}: {e}"}


def checksum_line(split: str, c: dict) -> str:
    full = f"rn50 inspect {split}.beton --verify"
    if c["state"] == "ok":
        return f"data     {split}.beton checksums: {c['checked']} random samples match (every sample: {full})"
    if c["state"] == "failed":
        return (
            f"data     {split}.beton checksums: FAILED, {len(c['bad'])} of {c['checked']} random samples differ "
            f"(first: sample {c['bad'][0]}): the file is damaged; {full} lists them, then copy or re-convert it"
        )
    return f"data     {split}.beton checksums: {c['note']}"


def beton_storage(path: Path) -> dict:
    """How a beton stores its images, from its index: counts, mean bytes per JPEG and per raw sample, and the
    all-JPEG size this dataset would have (an estimate: the raw samples at this beton's mean JPEG size)."""
    from dataset_tools.beton_format import JPEG_MODE, image_column, read_index

    column = image_column(read_index(path))
    jpeg = column.modes == JPEG_MODE
    jpeg_mean = float(column.sizes[jpeg].mean()) if jpeg.any() else None
    raw_mean = float(column.sizes[~jpeg].mean()) if (~jpeg).any() else None
    stored = int(column.sizes.sum())
    return {
        "samples": len(column.labels),
        "raw": column.num_raw,
        "jpeg_bytes_mean": jpeg_mean,
        "raw_bytes_mean": raw_mean,
        "stored_bytes": stored,
        "all_jpeg_bytes_estimate": int(jpeg_mean * len(column.labels)) if jpeg_mean else None,
    }


def all_jpeg_advice(facts: dict, ram_gib: float, gpu_decode: bool) -> list[str]:
    """What an all-JPEG beton would cost and gain here, from the betons' own indexes."""
    storage = facts.get("storage") or {}
    raw = sum(s["raw"] for s in storage.values())
    if not storage:
        return []
    if raw == 0:
        return [
            (
                "all-JPEG betons: "
                + (
                    "DALI decodes them on the GPU (--loader auto picks it)"
                    if gpu_decode
                    else "ready for GPU decoding by DALI on a machine with a GPU and DALI"
                )
                + "; the ffcv backend decodes "
                "every image on the CPU (README, Data pipelines: what all-JPEG costs in CPU decode speed)"
            )
        ]
    total = sum(s["samples"] for s in storage.values())
    now = sum(s["stored_bytes"] for s in storage.values()) / GIB
    estimates = [s["all_jpeg_bytes_estimate"] for s in storage.values()]
    if None in estimates:  # a beton with no JPEG sample: nothing here to estimate the JPEG size from
        return [
            f"{raw:,} of {total:,} images are stored raw; rn50 convert --compress-prob 1 writes all-JPEG betons "
            "for GPU decoding by DALI"
        ]
    jpeg = sum(estimates) / GIB
    fits = "fits" if jpeg <= 0.8 * ram_gib else "does not fit"
    return [
        f"all-JPEG (rn50 convert --compress-prob 1): {raw:,} of {total:,} images are stored raw now; all JPEG "
        f"they would take ~{jpeg:.2f} GiB instead of {now:.2f} GiB of image data (estimated from these betons' "
        f"own JPEG samples), which {fits} in 80% of RAM ({ram_gib:.0f} GiB). Gain: DALI decodes them on the GPU"
        + (" (--loader auto picks it then)" if gpu_decode else "")
        + "; cost: the ffcv backend decodes every "
        "image on the CPU instead of copying half of them (README, Data pipelines: measured decode speeds)"
    ]


def probe_loader(data_dir: Path, workers: int, device: str, batches: int = 8, batch_size: int = 64) -> dict:
    import torch

    from dataset_tools.beton_format import read_index
    from pipeline import LoaderOptions, Placement, build_loader
    from pipeline.folders import has_beton

    def build(bs):
        return build_loader(
            data_dir,
            "train",
            batch_size=bs,
            resolution=160,
            placement=Placement(device, torch.float32),
            options=LoaderOptions("auto", workers),
            seed=0,
            drop_last=False,
            verbose=False,
        )

    # A small dataset gets smaller batches, so the probe still times several. The beton's count is read from its
    # index, which spares building (and JIT-compiling) an FFCV loader twice.
    if has_beton(data_dir, "train"):
        batch_size = max(1, min(batch_size, read_index(data_dir / "train.beton").num_samples // (batches + 1)))
    loader = build(batch_size)
    if len(loader) < batches + 1:
        batch_size = max(1, loader.num_samples // (batches + 1))
        loader = build(batch_size)
    # the first batch apart: JIT compilation, worker start-up, cold cache
    timed = measure(iter(loader).__next__, torch.device(device), warmup=1, window=min(batches, len(loader) - 1))
    rate = timed.images_per_s if timed.images else None
    return {
        "backend": loader.backend,
        "first_batch_s": timed.warmup_s,
        "images_per_s": rate,
        "batch_size": batch_size,
        "resolution": 160,
        "workers": workers,
    }


def fitting_batch_size(res: int = 224, precision: str = "auto", probe_batch: int = 64) -> dict:
    """Peak training memory at `probe_batch`, extrapolated linearly to the largest multiple of 32 that stays under
    90% of the GPU's memory (activations dominate and scale with the batch)."""
    import torch

    from benchmarks.step_bench import measure_step

    props = torch.cuda.get_device_properties(0)
    torch.cuda.empty_cache()
    small = measure_step("resnet50", res, probe_batch // 2, precision, False, True, "cuda", 2, 2, 1)
    torch.cuda.empty_cache()
    big = measure_step("resnet50", res, probe_batch, precision, False, True, "cuda", 2, 3, 1)
    per_image = max((big["peak_memory_gib"] - small["peak_memory_gib"]) / (probe_batch - probe_batch // 2), 1e-6)
    fixed = big["peak_memory_gib"] - per_image * probe_batch
    budget = 0.9 * props.total_memory / GIB
    fits = int((budget - fixed) / per_image) // 32 * 32
    return {
        "res": res,
        "precision": big["precision"],
        "gib_per_image": per_image,
        "fixed_gib": fixed,
        "max_batch_size": fits,
        "step_images_per_s_at_probe": big["images_per_s"],
        "probe_batch": probe_batch,
    }


def recommend(info: dict, facts: dict | None, probes: dict) -> list[str]:
    cores, gpus = info["cores"], (info["gpu"] or {}).get("count", 0)
    per_gpu = max(1, cores // max(1, gpus))
    ram = info["memory"]["total_gib"]
    recs = []
    if facts is None:
        recs.append("pass --data-dir to check the dataset against this machine's memory and disk")
    elif facts["betons"]:
        size = sum(facts["betons"].values()) / GIB
        storage = facts.get("storage") or {}
        gpu_decode = bool(gpus) and info.get("dali", False)
        if gpu_decode and storage and all(s["raw"] == 0 for s in storage.values()):
            recs.append(
                "loader: dali (all-JPEG betons, DALI and a GPU): the GPU decodes them (--loader auto picks "
                "it); knobs per GPU kind: --hw-decoder-load, --dali-threads, --dali-prefetch"
            )
        else:
            recs.append(f"loader: ffcv (betons found), --workers {per_gpu} per GPU (FFCV decodes on threads)")
        recs += all_jpeg_advice(facts, ram, gpu_decode)
        if size <= 0.8 * ram:
            recs.append(
                f"in memory: the betons ({size:.1f} GiB) fit in RAM ({ram:.0f} GiB): keep the page cache "
                "on (the default); epoch 1 reads the disk, later epochs the page cache, shared by every "
                "GPU's process"
            )
        else:
            recs.append(
                f"not in memory: the betons ({size:.1f} GiB) exceed 80% of RAM ({ram:.0f} GiB): use "
                "rn50 train --no-os-cache --loader-order quasi_random (FFCV's process cache reads only the "
                "pages coming batches need); or re-convert smaller -- published full-ImageNet train sizes: "
                + "; ".join(f"{k} {v:.0f} GB" for k, v in FFCV_SIZES_GB.items())
            )
    elif facts["folders"]:
        est = facts["folders"].get("train", {}).get("bytes_estimate", 0) / GIB
        if gpus:
            recs.append(
                "loader: dali (image folders, GPU present): JPEGs decoded on the GPU; or convert once "
                "(rn50 convert) for the ffcv loader"
            )
        else:
            recs.append(
                "loader: torchvision (image folders, no GPU); convert once with rn50 convert for the faster ffcv loader"
            )
        recs.append(
            f"conversion: train JPEGs ~{est:.2f} GiB here; rn50 convert's defaults (half stored raw) take "
            f"~2.4x that on disk (ffcv-imagenet users report ~340 GB for ImageNet's ~140 GB of train JPEGs); "
            f"--compress-prob 1.0 stays near the JPEG size and is what DALI decodes on the GPU; free disk: "
            f"{facts['disk_free_gib']:.0f} GiB"
        )
    if gpus == 0:
        recs.append("no GPU: training will run on the CPU (fine for tests and the demo, far too slow for ImageNet)")
    elif "batch" in probes:
        b = probes["batch"]
        recs.append(
            f"batch size: up to {b['max_batch_size']} per GPU fits at {b['res']} px in {b['precision']} "
            f"(~{b['gib_per_image'] * 1024:.0f} MiB per image); ResNet-50 recipes use 256 or 512"
        )
    if "loader" in probes and "batch" in probes and probes["loader"]["images_per_s"]:
        rate, need = probes["loader"]["images_per_s"], probes["batch"]["step_images_per_s_at_probe"]
        verdict = "keeps up with" if rate >= 0.95 * need else "is slower than"
        recs.append(
            f"quick probe: the loader ({rate:,.0f} img/s at 160 px) {verdict} the train step "
            f"({need:,.0f} img/s at {probes['batch']['res']} px); rn50 bench keepup measures it properly"
        )
    return recs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 doctor",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", help="betons (train.beton) or an ImageNet-layout folder")
    p.add_argument("--no-probe", action="store_true", help="skip the loader and GPU probes")
    p.add_argument("--workers", type=int, default=None, help="loader workers for the probe (default: cores per GPU)")
    p.add_argument("--json", help="also write everything to this JSON file")
    p.add_argument(
        "--instance",
        metavar="NAME",
        help="instead: does the loader keep up on this EC2 instance (or all)? vCPUs per GPU, the loader rate this "
        "project measured there (or the nearest, scaled), the GPU's training rate, each with its source",
    )
    return p


def instance_report(name: str) -> int:
    from benchmarks import instances
    from benchmarks.reference import CPU_DIR, ReferenceError, load_all

    if name != "all" and name not in instances.INSTANCES:
        print(
            f"rn50 doctor: error: --instance {name}: not one of the README's recipes' instances "
            f"({', '.join(instances.INSTANCES)}, or all)",
            file=sys.stderr,
        )
        return 2
    try:
        refs, cpu = load_all(), load_all(CPU_DIR, need_gpu=False)
    except (ReferenceError, ValueError, OSError) as e:
        print(f"rn50 doctor: error: {e}", file=sys.stderr)
        return 2
    print(instances.report(name, refs, cpu))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.instance:
        return instance_report(args.instance)
    info = machine_info()
    info["memory"] = memory()
    info["driver"] = driver_version()
    from pipeline import available_backends

    info["dali"] = "dali" in available_backends()
    gpu = info["gpu"]
    print(f"CPU      {info['cpu']}, {info['cores']} usable cores")
    print(f"RAM      {info['memory']['total_gib']:.1f} GiB total, {info['memory']['available_gib']:.1f} GiB available")
    if gpu:
        print(
            f"GPU      {gpu['count']} x {gpu['name']} ({gpu['memory_gib']} GiB, compute {gpu['capability']}), "
            f"driver {info['driver'] or '?'}, CUDA {gpu['cuda']}"
        )
    else:
        print("GPU      none found (torch.cuda.is_available() is False): training and GPU benchmarks need one")
    print(
        "software "
        + ", ".join(f"{k} {v or 'missing'}" for k, v in info["versions"].items())
        + f", python {info['python']}"
    )
    facts, probes = None, {}
    if args.data_dir:
        data_dir = Path(args.data_dir)
        if not data_dir.is_dir():
            print(f"rn50 doctor: error: {data_dir}: no such folder", file=sys.stderr)
            return 2
        facts = dataset_facts(data_dir)
        for split, size in facts["betons"].items():
            st = facts["storage"][split]
            kinds = f"{st['raw']:,} of {st['samples']:,} images raw" if st["raw"] else f"all {st['samples']:,} JPEG"
            means = ", ".join(
                f"{k} {st[f'{k}_bytes_mean'] / 1e3:,.0f} kB" for k in ("jpeg", "raw") if st[f"{k}_bytes_mean"]
            )
            print(f"data     {split}.beton {size / GIB:.2f} GiB: {kinds} (mean per image: {means})")
            print(checksum_line(split, facts["checksums"][split]))
        for split, why in (facts.get("unreadable") or {}).items():
            print(f"data     {split}.beton cannot be read: {why}")
        for split, f in facts["folders"].items():
            print(
                f"data     {split}/ {f['classes']} classes, ~{f['images_estimate']:,} images, "
                f"~{f['bytes_estimate'] / GIB:.2f} GiB (sampled)"
            )
        if not facts["betons"] and not facts["folders"] and not facts.get("unreadable"):
            print(f"data     {data_dir} holds neither train.beton nor train/<wnid>/ folders")
        if facts.get("skipped_at_conversion"):
            print(f"data     files skipped at conversion: {facts['skipped_at_conversion']} (see convert_report.json)")
        print(f"disk     {facts['disk_free_gib']:.0f} GiB free at {data_dir}")
        if not args.no_probe and (facts["betons"] or facts["folders"]):
            workers = args.workers or max(1, info["cores"] // max(1, (gpu or {}).get("count", 1)))
            try:
                probes["loader"] = probe_loader(data_dir, workers, "cuda" if gpu else "cpu")
                p = probes["loader"]
                print(
                    f"probe    loader {p['backend']}: first batch {p['first_batch_s']:.1f} s, then "
                    f"{p['images_per_s'] or 0:,.0f} img/s (160 px, batch {p['batch_size']}, {workers} workers)"
                )
            except Exception as e:  # a probe must not hide the rest of the report
                print(f"probe    loader failed: {type(e).__name__}: {e}")
    if gpu and not args.no_probe:
        try:
            probes["batch"] = fitting_batch_size()
            b = probes["batch"]
            print(
                f"probe    GPU step {b['step_images_per_s_at_probe']:,.0f} img/s (resnet50, {b['res']} px, batch "
                f"{b['probe_batch']}, {b['precision']}); ~{b['gib_per_image'] * 1024:.0f} MiB per image"
            )
        except Exception as e:
            print(f"probe    GPU step failed: {type(e).__name__}: {e}")
    elif not gpu:
        print("probe    GPU step skipped: no GPU")
    recs = recommend(info, facts, probes)
    print("\nrecommendations:")
    for r in recs:
        print(f"  - {r}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"machine": info, "data": facts, "probes": probes, "recommendations": recs}, indent=2, default=str
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
