"""`rn50 bench proof --data DIR`: does each loader path keep up with the compiled train step? The measurement behind
scripts/gpu_check.sh (which runs it as `python -m benchmarks.gpu_proof`), written as a reference file
(benchmarks/reference/<card>_<date>.json).

    rn50 bench proof --data gpu_out/data --res 160,192,224
    rn50 bench proof --data gpu_out/data --res 160 --sweeps hw_decoder_load     # shorter

DIR is made by `rn50 bench data` (betons/, folders/, betons_mixed/, dataset.json). For each resolution the model is
built and compiled once; in that one process it is then timed
1. alone, on one synthetic batch already on the device (the ceiling),
2. for each loader path -- DALI from the beton, DALI from the image folders, the ffcv backend -- the loader alone,
   then the loader feeding the same compiled step.
Every row is the keep-up method of benchmarks.timing (`keep_up`, the same as `rn50 bench keepup`): a window of
`--window` batches (200) inside one epoch, after `--warmup` batches of that epoch (epoch starts, pipeline builds,
FFCV's JIT and torch's compilation never fall into a window), timed with CUDA events (the GPU's timeline, from the
window's first launch to its last batch's end: a GPU starved of data counts, and a loader alone is done when its last
batch is on the device -- both backends make the current stream wait for it). The keep-up ratio is end to end / step
alone. Process cores: the CPU seconds this process spent per second of the window (FFCV's and DALI's threads run in
it).

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

from benchmarks.report import driver_version, machine_info, report_failure, usable_cores
from benchmarks.timing import Measurement, in_epoch, keep_up, measure, train_step_fn

SWEEPS = {"hw_decoder_load": [0.0, 0.65, 0.9, 0.99], "dali_threads": [4, 6, 8, 12], "dali_prefetch": [2, 3, 5]}
EXTRAS = {"mixed": "DALI on the half-raw beton", "plain-ffcv": "plain FFCV Loader"}
# the riskiest path first: the half-raw beton runs DALI's conditional around the mixed decoder
SWEEP_ORDER = ("mixed", "hw_decoder_load", "dali_threads", "dali_prefetch", "plain-ffcv")
PATHS = {
    "dali-beton": ("dali", "beton"),
    "dali-beton-thread": ("dali", "beton"),  # with the feed thread (DALIOptions.feed_thread)
    "dali-folder": ("dali", "folder"),
    "ffcv": ("ffcv", "beton"),
}
FEED_THREAD = {"dali-beton-thread"}


# sweep name (a flag of rn50 train) -> its field of pipeline.DALIOptions
DALI_KNOBS = {"hw_decoder_load": "hw_decoder_load", "dali_threads": "threads", "dali_prefetch": "prefetch"}


def build(path: str, data: Path, res: int, args, device, dtype, **knobs):
    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    backend, source = PATHS[path]
    where = data / ("betons" if source == "beton" else "folders")
    dali = (
        DALIOptions(source=source, feed_thread=path in FEED_THREAD, **{DALI_KNOBS[k]: v for k, v in knobs.items()})
        if backend == "dali"
        else None
    )
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
                self.info, self.out_dir, driver=driver_version(), **self.data, skipped=self.skipped, seconds=seconds
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
        prog="rn50 bench proof",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder made by rn50 bench data")
    p.add_argument("--res", default="160,192,224")
    p.add_argument(
        "--paths",
        default="dali-beton,dali-beton-thread,dali-folder,ffcv",
        help="loader paths to time (dali-beton-thread: DALI from the beton with the feed thread)",
    )
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
    proof = Proof.start(args)
    if isinstance(proof, int):
        return proof
    loaders: dict = {}
    try:
        for res in proof.resolutions:
            if proof.over_budget(f"{res} px", args.resolution_s):
                continue
            alone = proof.step_at(res)
            if alone is None:
                continue
            parts, rate = alone
            for path in proof.paths:
                if not proof.over_budget(f"{path} at {res} px"):
                    proof.keepup_row(path, res, parts, rate, loaders)
            del parts
    finally:
        for loader in loaders.values():
            _close(loader)
    for name in (n for n in SWEEP_ORDER if n in proof.wanted):
        if name in SWEEPS:
            for value in SWEEPS[name]:
                if not proof.over_budget(f"{name}={value}"):
                    proof.sweep_row(name, value)
        elif not proof.over_budget(EXTRAS[name]):
            proof.extra_row(name)
    return proof.finish()


def step_alone(
    parts, device, batch_size: int, res: int, num_classes: int, dtype, warmup: int, window: int
) -> Measurement:
    """The step alone on one synthetic batch already on the device: the ceiling a loader path is measured against."""
    from benchmarks.step_bench import synthetic_batches

    return measure(
        synthetic_batches(batch_size, res, num_classes, dtype, device),
        device,
        step=train_step_fn(parts, device),
        warmup=warmup,
        window=window,
    )


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


class Proof:
    """One run of the proof: its settings, budget and results; each method measures one row and records it, or
    records why it could not."""

    def __init__(self, args, device, data: Path, out_dir: Path, deadline: float, started: float) -> None:
        from training.engine import resolve_precision

        self.args, self.device, self.data, self.deadline, self.epoch = args, device, data, deadline, 0
        self.resolutions = [int(r) for r in args.res.split(",") if r.strip()]
        self.paths = [x for x in args.paths.split(",") if x]
        self.wanted = [x for x in args.sweeps.split(",") if x]
        self.compiled = not args.no_compile
        self.precision = resolve_precision(args.precision, device)
        self.dtype = self.precision.input_dtype
        self.classes = len(json.loads((data / "betons" / "classes.json").read_text()))
        self.info = machine_info()
        settings = {
            "arch": args.arch,
            "batch_size": args.batch_size,
            "precision": self.precision.name,
            "compiled": self.compiled,
            "window_batches": args.window,
            "warmup_batches": args.warmup,
            "workers": args.workers,
            "resolutions": self.resolutions,
        }
        dataset = json.loads((data / "dataset.json").read_text())
        self.results = Results(args, self.info, dataset, settings, out_dir, started)

    @classmethod
    def start(cls, args) -> Proof | int:
        """The proof, or 2 after one line saying what is wrong with the arguments or the data."""
        import torch

        from benchmarks.reference import REFERENCE_DIR
        from benchmarks.step_bench import resolve_device

        started = time.perf_counter()
        deadline = (args.started_at if args.started_at is not None else time.time()) + args.budget_s
        data, device = Path(args.data), resolve_device(args.device)
        problem = None
        if device.type != "cuda" and args.out_dir is None:
            problem = (
                "no CUDA device, and a reference file is a GPU measurement; pass --out-dir to try the script elsewhere"
            )
        elif not (data / "dataset.json").is_file():
            problem = f"{data}/dataset.json missing; make the data with rn50 bench data {data}"
        else:
            unknown = [x for x in args.paths.split(",") if x and x not in PATHS]
            unknown += [x for x in args.sweeps.split(",") if x and x not in SWEEP_ORDER]
            if unknown or not [r for r in args.res.split(",") if r.strip()]:
                problem = (
                    f"unknown {', '.join(unknown) or 'nothing'} (paths: {', '.join(PATHS)}; sweeps: "
                    f"{', '.join(SWEEP_ORDER)}); --res needs at least one resolution"
                )
        if problem:
            print(f"gpu_proof: error: {problem}", file=sys.stderr)
            return 2
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        out_dir = Path(args.out_dir) if args.out_dir else REFERENCE_DIR
        return cls(args, device, data, out_dir, deadline, started)

    def over_budget(self, what: str, need_s: float = 0.0) -> bool:
        left = self.deadline - time.time()
        if left < need_s or left <= 0:
            print(f"gpu_proof: skipped {what} ({left:.0f} s of --budget-s left)", flush=True)
            self.results.skip(f"{what} (budget)")
            return True
        return False

    def failed(self, what: str, e: BaseException) -> None:
        self.results.skip(report_failure("gpu_proof", what, e))

    def step_at(self, res: int):
        """(the model's parts, the step alone) at `res`, or None (recorded) when the step fails there."""
        import torch

        from benchmarks.step_bench import make_parts

        a, mode = self.args, "compiled" if self.compiled else "eager"
        try:
            torch._dynamo.reset()  # each resolution's model compiles afresh (as bench step does), once
            parts, _ = make_parts(a.arch, self.classes, a.precision, self.device, self.compiled, True)
            alone = step_alone(parts, self.device, a.batch_size, res, self.classes, self.dtype, a.step_warmup, a.window)
        except Exception as e:  # no step, no keep-up rows at this resolution; the next one may still work
            self.failed(f"the {mode} step at {res} px", e)
            return None
        self.results.step_alone.append(
            {
                "res": res,
                "images_per_s": alone.images_per_s,
                "warmup_s": alone.warmup_s,
                "process_cores": alone.process_cores,
            }
        )
        print(
            f"{res} px: step alone {alone.images_per_s:,.0f} img/s ({mode}, warm-up {alone.warmup_s:.0f} s)", flush=True
        )
        return parts, alone

    def keepup_row(self, path: str, res: int, parts, alone: Measurement, loaders: dict) -> None:
        """One loader path alone and feeding the step (benchmarks.timing.keep_up); a failure costs this row only."""
        a = self.args
        try:
            if path not in loaders:
                loaders[path] = build(path, self.data, res, a, self.device, self.dtype)
            loader = loaders[path]
            loader.set_resolution(res)
            self.epoch += 2
            k = keep_up(loader, parts, alone, self.device, epoch=self.epoch - 1, warmup=a.warmup, window=a.window)
        except Exception as e:  # one path failing must not lose the others' rows
            self.failed(f"{path} at {res} px", e)
            broken = loaders.pop(path, None)
            if broken is not None:
                _close(broken)
            return
        row = keepup_row(path, res, self.compiled, k["loader_alone"], k["fed"], alone, a.workers)
        if PATHS[path][0] == "dali":
            row["knobs"] = loader.tuning.as_dict()
        self.results.add("keepup", row)
        cores = row["process_cores"]
        print(
            f"  {path:11s} alone {row['loader_alone_images_per_s']:>9,.0f} img/s | fed "
            f"{row['end_to_end_images_per_s']:>9,.0f} img/s | ratio {row['ratio']:.3f} | wait "
            f"{100 * row['data_wait_share']:.0f}% | cores {'-' if cores is None else f'{cores:.1f}'}",
            flush=True,
        )

    def sweep_row(self, name: str, value) -> None:
        """DALI from the beton alone with one knob changed, in a fresh pipeline."""
        res, loader = self.resolutions[0], None
        try:
            loader = build("dali-beton", self.data, res, self.args, self.device, self.dtype, **{name: value})
            self.epoch += 1
            r = in_epoch(loader, self.epoch, self.device, warmup=self.args.warmup, window=self.args.window)
        except Exception as e:
            self.failed(f"{name}={value}", e)
            return
        finally:
            if loader is not None:
                _close(loader)  # its pinned and device buffers go now, not at the next garbage collection
        t = loader.tuning
        row = {
            "value": value,
            "images_per_s": round(r.images_per_s, 1),
            "process_cores": _round(r.process_cores, 2),
            "what": f"DALI from the beton, loader alone, {res} px",
            "knobs": f"load {t.hw_decoder_load}, {t.threads} threads, prefetch {t.prefetch}",
        }
        self.results.add("sweeps", row, sweep=name)
        print(f"  sweep {name}={value}: {r.images_per_s:,.0f} img/s, cores {_num(r.process_cores)}", flush=True)

    def extra_row(self, name: str) -> None:
        try:
            row = (mixed_beton if name == "mixed" else plain_ffcv)(
                self.data, self.resolutions[0], self.args, self.device, self.precision
            )
        except Exception as e:
            self.failed(EXTRAS[name], e)
            return
        self.results.add("extras", row)
        print(f"  {row['what']}: {row['images_per_s']:,.0f} img/s, {_num(row['process_cores'])} cores", flush=True)

    def finish(self) -> int:
        from benchmarks.reference import render_one, validate

        results = self.results
        results.persist()
        if results.skipped:
            print("skipped or failed: " + "; ".join(results.skipped), flush=True)
        if results.path is None:
            print("gpu_proof: no keep-up row was measured, so no reference file was written", file=sys.stderr)
            return 1
        final = json.loads(results.path.read_text())
        print(f"wrote {results.path} ({final['seconds']:.0f} s)")
        if self.info["gpu"]:
            validate(final, str(results.path))
            print("\n" + render_one(results.path, final))
        return 0


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def keepup_row(
    path: str, res: int, compiled: bool, solo: Measurement, fed: Measurement, alone: Measurement, workers: int
) -> dict:
    backend, source = PATHS[path]
    fed_rate, alone_rate = round(fed.images_per_s, 1), round(alone.images_per_s, 1)
    return {
        "backend": backend,
        "source": source,
        "res": res,
        "compiled": compiled,
        "loader_alone_images_per_s": round(solo.images_per_s, 1),
        "end_to_end_images_per_s": fed_rate,
        "step_alone_images_per_s": alone_rate,
        "ratio": round(fed_rate / alone_rate, 4),  # of the rounded figures, so the file agrees with itself
        "data_wait_share": round(fed.data_wait_share, 4),
        "process_cores": _round(fed.process_cores, 2),
        "loader_alone_process_cores": _round(solo.process_cores, 2),
        "workers": workers,
        **({"feed_thread": True} if path in FEED_THREAD else {}),
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
        epochs = 3
        batches = (batch for _ in range(epochs) for batch in mixed)
        r = measure(batches.__next__, device, window=None)
        return {
            "what": f"DALI from the half-raw beton ({mixed.source.describe_storage()}), {res} px, alone, {epochs} "
            f"whole epochs of {len(mixed)} batches (epoch starts inside the timing)",
            "images_per_s": round(r.images_per_s, 1),
            "process_cores": _round(r.process_cores, 2),
        }
    finally:
        _close(mixed)


def plain_ffcv(data: Path, res: int, args, device, precision) -> dict:
    from benchmarks.loader_bench import normalised, plain_ffcv_loader

    plain = plain_ffcv_loader(data / "betons" / "train.beton", args.batch_size, res, args.workers, 0)
    batches = iter(normalised(plain, device, precision.input_dtype))
    r = measure(batches.__next__, device, warmup=args.warmup, window=args.window)
    return {
        "what": f"plain FFCV Loader (RandomResizedCrop + flip), same beton, {res} px, alone",
        "images_per_s": round(r.images_per_s, 1),
        "process_cores": _round(r.process_cores, 2),
    }


def _close(loader) -> None:
    try:
        loader.close()
    except Exception as e:  # a loader that cannot close must not end the run
        report_failure("gpu_proof", f"closing the {getattr(loader, 'backend', '?')} loader", e)


if __name__ == "__main__":
    sys.exit(main())
