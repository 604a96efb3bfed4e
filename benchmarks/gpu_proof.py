"""`python -m benchmarks.gpu_proof --data DIR`: does each loader path keep up with the compiled train step? The
measurement behind scripts/gpu_check.sh, written as a reference file (benchmarks/reference/<card>_<date>.json).

    python -m benchmarks.gpu_proof --data gpu_out/data --res 160,192,224
    python -m benchmarks.gpu_proof --data gpu_out/data --res 160 --sweeps hw_decoder_load     # shorter

DIR is made by `python -m benchmarks.bench_data` (betons/, folders/, betons_mixed/, dataset.json). For each
resolution the model is built and compiled once; in that one process it is then timed
1. alone, on one synthetic batch already on the device (the ceiling),
2. for each loader path -- DALI from the beton, DALI from the image folders, the ffcv backend -- the loader alone,
   then the loader feeding the same compiled step.
Every timed window is `--window` batches (200) inside one epoch, after `--warmup` batches of that epoch (epoch
starts, pipeline builds, FFCV's JIT and torch's compilation never fall into a window), timed with CUDA events (the
GPU's timeline, from the window's first launch to its last batch's end: a GPU starved of data counts, and a loader
alone is done when its last batch is on the device -- both backends make the current stream wait for it). The
keep-up ratio is end to end / step alone. Process cores: the CPU seconds this process spent per second of the
window (FFCV's and DALI's threads run in it).

Then, in this order (the riskiest first), at the first resolution: DALI on the half-raw beton (`mixed`: the DALI
conditional around the mixed decoder, the raw-sample path on the GPU); the DALI knobs, each value a fresh pipeline,
DALI from the beton alone -- hw_decoder_load (0, 0.65, 0.9, 0.99), threads (4, 6, 8, 12), prefetch (2, 3, 5); a
plain FFCV Loader on the same beton (`plain-ffcv`, the ffcv backend's baseline).

Nothing measured is lost: the reference file (once there is a keep-up row), its copy (--copy-to, e.g. $OUT) and
the whole record (--json: rows, step-alone figures, everything skipped or failed) are rewritten after every row. A
path, sweep value or resolution that fails is one entry in `skipped` with its cause (chained causes included:
DALI's own message) and its full traceback on stderr; the others still run. `--budget-s`, counted from
`--started-at` (scripts/gpu_check.sh passes its own start), skips what would start late, and names it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.report import machine_info, report_failure, usable_cores

SWEEPS = {"hw_decoder_load": [0.0, 0.65, 0.9, 0.99], "dali_threads": [4, 6, 8, 12], "dali_prefetch": [2, 3, 5]}
EXTRAS = {"mixed": "DALI on the half-raw beton", "plain-ffcv": "plain FFCV Loader"}
# the riskiest path first: the half-raw beton runs DALI's conditional around the mixed decoder
SWEEP_ORDER = ("mixed", "hw_decoder_load", "dali_threads", "dali_prefetch", "plain-ffcv")
PATHS = {"dali-beton": ("dali", "beton"), "dali-folder": ("dali", "folder"), "ffcv": ("ffcv", "beton")}


class Window:
    """CUDA events around a stretch of work (perf_counter on the CPU), plus this process's CPU time over it."""

    def __init__(self, device) -> None:
        import torch

        self.cuda, self.torch = device.type == "cuda", torch

    def __enter__(self) -> Window:
        self.cpu0 = time.process_time()  # user + system time of every thread of this process
        self.t0 = time.perf_counter()
        if self.cuda:
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.start.record()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.seconds = self.start.elapsed_time(end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0
        wall = time.perf_counter() - self.t0
        self.cores = (time.process_time() - self.cpu0) / wall


def step_alone(parts, device, batch_size: int, res: int, num_classes: int, dtype, warmup: int, window: int) -> dict:
    from benchmarks.step_bench import synthetic_batches
    from training.engine import train_step

    batch = synthetic_batches(batch_size, res, num_classes, dtype, device)
    t0 = time.perf_counter()
    for i in range(warmup):
        train_step(parts, [batch()], i, device)
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    with Window(device) as w:
        for i in range(window):
            train_step(parts, [batch()], warmup + i, device)
    return {"images_per_s": window * batch_size / w.seconds, "warmup_s": warm_s, "process_cores": w.cores}


def loader_window(loader, epoch: int, warmup: int, window: int, device, parts=None) -> dict:
    """`window` batches of epoch `epoch` after `warmup` of them: the loader alone, or feeding `parts`' step."""
    from training.engine import train_step

    if len(loader) < warmup + window:
        raise ValueError(
            f"{loader.num_samples} samples make {len(loader)} batches per epoch, fewer than the "
            f"{warmup} + {window} a window needs (make more with benchmarks.bench_data --samples)"
        )
    loader.set_epoch(epoch)
    it = iter(loader)
    try:
        for i in range(warmup):
            images, labels = next(it)
            if parts is not None:
                train_step(parts, [(images, labels)], i, device)
        wait, n = 0.0, 0
        with Window(device) as w:
            for i in range(window):
                t0 = time.perf_counter()
                images, labels = next(it)
                wait += time.perf_counter() - t0
                n += images.shape[0]
                if parts is not None:
                    train_step(parts, [(images, labels)], warmup + i, device)
    finally:
        it.close()
    return {"images_per_s": n / w.seconds, "data_wait_share": min(1.0, wait / w.seconds), "process_cores": w.cores}


# sweep name (a flag of rn50 train) -> its field of pipeline.DALIOptions
DALI_KNOBS = {"hw_decoder_load": "hw_decoder_load", "dali_threads": "threads", "dali_prefetch": "prefetch"}


def build(path: str, data: Path, res: int, args, device, dtype, **knobs):
    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    backend, source = PATHS[path]
    where = data / ("betons" if source == "beton" else "folders")
    dali = DALIOptions(source=source, **{DALI_KNOBS[k]: v for k, v in knobs.items()}) if backend == "dali" else None
    return build_loader(
        where,
        "train",
        batch_size=args.batch_size,
        resolution=res,
        placement=Placement(device, dtype),
        options=LoaderOptions(backend, args.workers, dali=dali or DALIOptions()),
        seed=0,
        drop_last=True,
        verbose=False,
    )


class Results:
    """Everything measured so far, written after every row, sweep value and extra: the reference file (once there is
    a keep-up row; a copy in --copy-to) and the whole record, failures included, in --json. A run killed at any point
    leaves what it had measured."""

    def __init__(self, args, info: dict, dataset: dict, settings: dict, out_dir: Path, started: float) -> None:
        self.args, self.info, self.out_dir, self.started = args, info, out_dir, started
        self.data = {"dataset": dataset, "settings": settings, "keepup": [], "sweeps": {}, "extras": []}
        self.skipped: list[str] = []
        self.step_alone: list[dict] = []
        self.path: Path | None = None

    def add(self, part: str, row: dict, sweep: str | None = None) -> None:
        if part == "sweeps":
            self.data["sweeps"].setdefault(sweep, []).append(row)
        else:
            self.data[part].append(row)
        self.persist()

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.persist()

    def persist(self) -> None:
        import shutil

        from benchmarks.reference import save

        seconds = round(time.perf_counter() - self.started, 1)
        if self.data["keepup"]:
            self.path = save(
                self.info, self.out_dir, driver=_driver(), **self.data, skipped=self.skipped, seconds=seconds
            )
            if self.args.copy_to:
                Path(self.args.copy_to).mkdir(parents=True, exist_ok=True)
                shutil.copy(self.path, Path(self.args.copy_to) / self.path.name)
        if self.args.json:
            record = {"machine": self.info, **self.data, "step_alone": self.step_alone, "skipped": self.skipped}
            record.update(seconds=seconds, reference=str(self.path) if self.path else None)
            tmp = Path(self.args.json).with_name(f".{Path(self.args.json).name}.tmp")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
            os.replace(tmp, self.args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_proof",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder made by python -m benchmarks.bench_data")
    p.add_argument("--res", default="160,192,224")
    p.add_argument("--paths", default="dali-beton,dali-folder,ffcv", help="loader paths to time")
    p.add_argument(
        "--sweeps",
        default=",".join(SWEEP_ORDER),
        help="after the keep-up rows, in this order: mixed (DALI on the half-raw beton: the conditional around the "
        "mixed decoder), the hw_decoder_load, dali_threads and dali_prefetch sweeps, plain-ffcv (a plain FFCV Loader)",
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=usable_cores(), help="ffcv threads; DALI off Hopper (all cores)")
    p.add_argument("--window", type=int, default=200, help="timed batches per row, inside one epoch (200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches of the epoch first (10)")
    p.add_argument("--step-warmup", type=int, default=15, help="untimed steps before the step-alone window (15)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--precision", default="auto")
    p.add_argument("--no-compile", action="store_true", help="time the eager step instead")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="skip what would start after this many seconds from --started-at (480); a resolution, which compiles "
        "the model first, starts only with --resolution-s left",
    )
    p.add_argument("--resolution-s", type=float, default=120, help="time a resolution needs at least (120)")
    p.add_argument(
        "--started-at",
        type=float,
        default=None,
        help="the budget's clock start, as seconds since the epoch (scripts/gpu_check.sh passes its own start, so "
        "making the data counts); default: now",
    )
    p.add_argument("--out-dir", default=None, help="default benchmarks/reference/ (a GPU is then required)")
    p.add_argument("--copy-to", default=None, help="copy the reference file here after every row (e.g. $OUT)")
    p.add_argument("--json", default=None, help="everything measured and skipped, rewritten after every row")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    from benchmarks.reference import REFERENCE_DIR, render_one, validate
    from benchmarks.step_bench import make_parts, resolve_device
    from training.engine import resolve_precision

    t_start = time.perf_counter()
    deadline = (args.started_at if args.started_at is not None else time.time()) + args.budget_s
    data = Path(args.data)
    device = resolve_device(args.device)
    out_dir = Path(args.out_dir) if args.out_dir else REFERENCE_DIR
    if device.type != "cuda" and args.out_dir is None:
        print(
            "gpu_proof: error: no CUDA device, and a reference file is a GPU measurement; pass --out-dir to try "
            "the script elsewhere",
            file=sys.stderr,
        )
        return 2
    if not (data / "dataset.json").is_file():
        print(
            f"gpu_proof: error: {data}/dataset.json missing; make the data with python -m benchmarks.bench_data {data}",
            file=sys.stderr,
        )
        return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    resolutions = [int(r) for r in args.res.split(",") if r.strip()]
    paths = [x for x in args.paths.split(",") if x]
    wanted = [x for x in args.sweeps.split(",") if x]
    unknown = [x for x in paths if x not in PATHS] + [x for x in wanted if x not in SWEEP_ORDER]
    if unknown or not resolutions:
        print(
            f"gpu_proof: error: unknown {', '.join(unknown) or 'nothing'} (paths: {', '.join(PATHS)}; sweeps: "
            f"{', '.join(SWEEP_ORDER)}); --res needs at least one resolution",
            file=sys.stderr,
        )
        return 2
    compiled = not args.no_compile
    info = machine_info()
    precision = resolve_precision(args.precision, device)
    classes = len(json.loads((data / "betons" / "classes.json").read_text()))
    settings = {
        "arch": args.arch,
        "batch_size": args.batch_size,
        "precision": precision.name,
        "compiled": compiled,
        "window_batches": args.window,
        "warmup_batches": args.warmup,
        "workers": args.workers,
        "resolutions": resolutions,
    }
    results = Results(args, info, json.loads((data / "dataset.json").read_text()), settings, out_dir, t_start)

    def over_budget(what: str, need_s: float = 0.0) -> bool:
        left = deadline - time.time()
        if left < need_s or left <= 0:
            print(f"gpu_proof: skipped {what} ({left:.0f} s of --budget-s left)", flush=True)
            results.skip(f"{what} (budget)")
            return True
        return False

    def failed(what: str, e: BaseException) -> None:
        results.skip(report_failure("gpu_proof", what, e))

    loaders, epoch = {}, 0
    for res in resolutions:
        if over_budget(f"{res} px", args.resolution_s):
            continue
        try:
            torch._dynamo.reset()  # each resolution's model compiles afresh (as bench step does), once
            parts, _ = make_parts(args.arch, classes, args.precision, device, compiled, True)
            alone = step_alone(
                parts, device, args.batch_size, res, classes, precision.input_dtype, args.step_warmup, args.window
            )
        except Exception as e:  # no step, no keep-up rows at this resolution; the next one may still work
            failed(f"the {'compiled' if compiled else 'eager'} step at {res} px", e)
            continue
        results.step_alone.append({"res": res, **alone})
        print(
            f"{res} px: step alone {alone['images_per_s']:,.0f} img/s ({'compiled' if compiled else 'eager'}, "
            f"warm-up {alone['warmup_s']:.0f} s)",
            flush=True,
        )
        for path in paths:
            if over_budget(f"{path} at {res} px"):
                continue
            try:
                if path not in loaders:
                    loaders[path] = build(path, data, res, args, device, precision.input_dtype)
                loader = loaders[path]
                loader.set_resolution(res)
                epoch += 1
                solo = loader_window(loader, epoch, args.warmup, args.window, device)
                epoch += 1
                fed = loader_window(loader, epoch, args.warmup, args.window, device, parts)
            except Exception as e:  # one path failing must not lose the others' rows
                failed(f"{path} at {res} px", e)
                broken = loaders.pop(path, None)
                if broken is not None:
                    _close(broken)
                continue
            row = keepup_row(path, res, compiled, solo, fed, alone, args.workers)
            if PATHS[path][0] == "dali":
                row["knobs"] = loader.tuning.as_dict()
            results.add("keepup", row)
            print(
                f"  {path:11s} alone {row['loader_alone_images_per_s']:>9,.0f} img/s | fed "
                f"{row['end_to_end_images_per_s']:>9,.0f} img/s | ratio {row['ratio']:.3f} | wait "
                f"{100 * row['data_wait_share']:.0f}% | cores {row['process_cores']:.1f}",
                flush=True,
            )
        del parts
    for loader in loaders.values():
        _close(loader)
    res0 = resolutions[0]
    for name in (n for n in SWEEP_ORDER if n in wanted):
        if name in SWEEPS:
            for value in SWEEPS[name]:
                if over_budget(f"{name}={value}"):
                    continue
                loader = None
                try:
                    loader = build("dali-beton", data, res0, args, device, precision.input_dtype, **{name: value})
                    epoch += 1
                    r = loader_window(loader, epoch, args.warmup, args.window, device)
                except Exception as e:
                    failed(f"{name}={value}", e)
                    continue
                finally:
                    if loader is not None:
                        _close(loader)  # its pinned and device buffers go now, not at the next garbage collection
                t = loader.tuning
                row = {
                    "value": value,
                    "images_per_s": round(r["images_per_s"], 1),
                    "process_cores": round(r["process_cores"], 2),
                    "what": f"DALI from the beton, loader alone, {res0} px",
                    "knobs": f"load {t.hw_decoder_load}, {t.threads} threads, prefetch {t.prefetch}",
                }
                results.add("sweeps", row, sweep=name)
                print(
                    f"  sweep {name}={value}: {r['images_per_s']:,.0f} img/s, cores {r['process_cores']:.1f}",
                    flush=True,
                )
        elif not over_budget(EXTRAS[name]):
            try:
                row = (mixed_beton if name == "mixed" else plain_ffcv)(data, res0, args, device, precision)
            except Exception as e:
                failed(EXTRAS[name], e)
                continue
            results.add("extras", row)
            print(f"  {row['what']}: {row['images_per_s']:,.0f} img/s, {row['process_cores']:.1f} cores", flush=True)
    results.persist()
    if results.skipped:
        print("skipped or failed: " + "; ".join(results.skipped), flush=True)
    if results.path is None:
        print("gpu_proof: no keep-up row was measured, so no reference file was written", file=sys.stderr)
        return 1
    final = json.loads(results.path.read_text())
    print(f"wrote {results.path} ({final['seconds']:.0f} s)")
    if info["gpu"]:
        validate(final, str(results.path))
        print("\n" + render_one(results.path, final))
    return 0


def keepup_row(path: str, res: int, compiled: bool, solo: dict, fed: dict, alone: dict, workers: int) -> dict:
    backend, source = PATHS[path]
    fed_rate, alone_rate = round(fed["images_per_s"], 1), round(alone["images_per_s"], 1)
    return {
        "backend": backend,
        "source": source,
        "res": res,
        "compiled": compiled,
        "loader_alone_images_per_s": round(solo["images_per_s"], 1),
        "end_to_end_images_per_s": fed_rate,
        "step_alone_images_per_s": alone_rate,
        "ratio": round(fed_rate / alone_rate, 4),  # of the rounded figures, so the file agrees with itself
        "data_wait_share": round(fed["data_wait_share"], 4),
        "process_cores": round(fed["process_cores"], 2),
        "loader_alone_process_cores": round(solo["process_cores"], 2),
        "workers": workers,
    }


def mixed_beton(data: Path, res: int, args, device, precision) -> dict:
    """DALI on the half-raw beton, loader alone, whole epochs (it is not repeated: too short for a window)."""
    from pipeline import LoaderOptions, Placement, build_loader

    mixed = build_loader(
        data / "betons_mixed",
        "train",
        batch_size=args.batch_size,
        resolution=res,
        placement=Placement(device, precision.input_dtype),
        options=LoaderOptions("dali", args.workers),
        drop_last=True,
        verbose=False,
    )
    try:
        list(mixed)  # builds the pipeline, warms the page cache
        epochs, n = 3, 0
        with Window(device) as w:
            for _ in range(epochs):
                n += sum(x.shape[0] for x, _ in mixed)
        return {
            "what": f"DALI from the half-raw beton ({mixed.source.describe_storage()}), {res} px, alone, {epochs} "
            f"whole epochs of {len(mixed)} batches (epoch starts inside the timing)",
            "images_per_s": round(n / w.seconds, 1),
            "process_cores": round(w.cores, 2),
        }
    finally:
        _close(mixed)


def plain_ffcv(data: Path, res: int, args, device, precision) -> dict:
    from benchmarks.loader_bench import normalised, plain_ffcv_loader

    plain = plain_ffcv_loader(data / "betons" / "train.beton", args.batch_size, res, args.workers, 0)
    n, it = 0, iter(normalised(plain, device, precision.input_dtype))
    for _ in range(args.warmup):
        next(it)
    with Window(device) as w:
        for _ in range(args.window):
            n += next(it)[0].shape[0]
    return {
        "what": f"plain FFCV Loader (RandomResizedCrop + flip), same beton, {res} px, alone",
        "images_per_s": round(n / w.seconds, 1),
        "process_cores": round(w.cores, 2),
    }


def _close(loader) -> None:
    try:
        loader.close()
    except Exception as e:  # a loader that cannot close must not end the run
        report_failure("gpu_proof", f"closing the {getattr(loader, 'backend', '?')} loader", e)


def _driver() -> str | None:
    from benchmarks.doctor import driver_version

    return driver_version()


if __name__ == "__main__":
    sys.exit(main())
