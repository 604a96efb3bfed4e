"""`rn50 bench smoke --out DIR` (= `python -m benchmarks.gpu_smoke`): every GPU path once, each in its own process
under a timeout, with PASS / FAIL / TIMEOUT / SKIP and the full error of each appended to DIR/smoke.log and
DIR/smoke.json as it ends.

    rn50 bench smoke --out "$OUT"                               # every check (~1-2 min on an H200)
    rn50 bench smoke --out "$OUT" --checks env,graphs,fused-sgd,sync   # those needing neither FFCV nor DALI

It is what a first visit to a GPU machine runs before any benchmark: a path that breaks costs its own check and
nothing else, and what broke comes back with its cause (a check's traceback, chained causes included: DALI's own
message survives behind "Current pipeline object is no longer valid"; a hung check prints every thread's stack
through faulthandler before it is killed). A check whose package is missing is a SKIP that names the package.

The checks (data: DIR_DATA, default /tmp/rn50_smoke, made by the `data` check, about 100 small `rn50 synth` images):
    env              torch, CUDA, cuDNN, DALI, nvImageCodec, FFCV versions; the GPU, its free memory; the CPU
    data             the smoke data: an all-JPEG beton, a half-raw beton (rn50 convert's default) and image folders
    dali-beton       DALI decoding the all-JPEG beton on the GPU (default knobs): 3 batches checked for shape,
                     dtype, channels_last strides, device and finite values; the first compared with DALI's CPU
                     pipeline for the same (seed, epoch, indices): labels equal, mean |pixel difference| reported
                     (nvJPEG and libjpeg-turbo round differently: a few units out of 255 pass)
    dali-fp16        the same in float16 (the T4's precision), the first batch unchanged after two more are taken
    dali-thread      the same with the feed thread (DALIOptions.feed_thread: the pipeline driven off the training thread)
    dali-hw0         the same with hw_decoder_load 0 (nvJPEG's CUDA decoder only), pipeline build time reported
    dali-hw0.99      the same with hw_decoder_load 0.99 (nearly all to the hardware JPEG decoder, where there is one)
    dali-folder      DALI decoding the image folders on the GPU
    dali-mixed       DALI on the half-raw beton: the DALI conditional around the mixed decoder
    ffcv             the ffcv backend feeding the GPU, against the same backend on the CPU
    graphs           the whole step captured as a CUDA graph (ResNet-18, 64 px, fp32, the plain module) against the
                     eager step: losses and weights within the CPU test's tolerance
    graphs-compiled  the trainer's --step graphs (torch.compile, then the capture) against the eager step
    fused-sgd        SGD(fused=True) against torch's foreach SGD, three steps
    sync             no host synchronisation in an eager bf16 step with every augmentation on (benchmarks.sync_check)
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT_DATA = "/tmp/rn50_smoke"
BATCH, RES, CLASSES, PER_CLASS = 16, 128, 4, 24
PIXEL_TOLERANCE = 4.0  # mean |GPU - CPU| on the 0..255 scale that a decoder difference may make
# check -> what it needs ("cuda", "dali", "ffcv": importable packages or a device; "data": the data check passed)
CHECKS: dict[str, tuple[str, ...]] = {
    "env": (),
    "data": ("ffcv",),
    "dali-beton": ("cuda", "dali", "data"),
    "dali-mixed": ("cuda", "dali", "data"),
    "dali-fp16": ("cuda", "dali", "data"),
    "dali-thread": ("cuda", "dali", "data"),
    "dali-hw0": ("cuda", "dali", "data"),
    "dali-hw0.99": ("cuda", "dali", "data"),
    "dali-folder": ("cuda", "dali", "data"),
    "ffcv": ("cuda", "ffcv", "data"),
    "graphs": ("cuda",),
    "fused-sgd": ("cuda",),
    "sync": ("cuda",),
    "graphs-compiled": ("cuda",),
}


# checks that also run with --device cpu (the loader checks: GPU loader replaced by the same backend on the CPU)
CPU_TOO = (
    *("env", "data", "dali-beton", "dali-mixed", "dali-fp16", "dali-thread", "dali-hw0", "dali-hw0.99"),
    *("dali-folder", "ffcv"),
)


class CheckFailed(AssertionError):
    """A check's expectation not met; `details` (what was measured up to there) go into the results too."""

    def __init__(self, what: str, details: dict | None = None) -> None:
        super().__init__(what)
        self.details = details


def expect(ok: bool, what: str, details: dict | None = None) -> None:
    if not ok:
        raise CheckFailed(what, details)


# ---------------------------------------------------------------------------------------------------- the checks


def check_env(data: Path, device: str) -> dict:
    import platform
    from importlib import metadata

    import torch

    from benchmarks.report import cpu_model, driver_version, package_versions, usable_cores

    out: dict = {
        "python": platform.python_version(),
        "versions": package_versions(),
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "driver": driver_version(),
    }
    codecs = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        if "nvimgcodec" in name.lower() or "nvjpeg" in name.lower():
            codecs[name] = dist.version
    out["nvimgcodec"] = codecs or None
    try:
        import nvidia.dali as dali

        out["dali_module"] = dali.__version__
    except Exception as e:
        out["dali_module"] = f"not importable: {type(e).__name__}: {e}"
    if device == "cpu":
        return out
    expect(torch.cuda.is_available(), "torch sees no CUDA device", out)
    free, total = torch.cuda.mem_get_info()
    props = torch.cuda.get_device_properties(0)
    out.update(
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=round(total / 2**30, 1),
        free_memory_gib=round(free / 2**30, 1),
        gpus=torch.cuda.device_count(),
    )
    return out


def check_data(data: Path, device: str) -> dict:
    """A small dataset in three forms; reused when complete (the marker is written last)."""
    from dataset_tools.convert import ConvertOptions, convert
    from dataset_tools.synth import synthesize

    marker = data / "smoke_data.json"
    if marker.is_file():
        return {**json.loads(marker.read_text()), "reused": True}
    t0 = time.perf_counter()
    synthesize(
        data / "folders",
        num_classes=CLASSES,
        train_per_class=PER_CLASS,
        val_per_class=0,
        seed=0,
        workers=min(8, os.cpu_count() or 1),
        min_short=96,
        max_short=400,
        progress=False,
    )
    workers = min(8, os.cpu_count() or 1)
    for name, prob in (("betons", 1.0), ("betons_mixed", 0.5)):
        convert(
            data / "folders",
            data / name,
            ["train"],
            ConvertOptions(workers=workers, compress_prob=prob, progress=False),
        )
    facts = {"images": CLASSES * PER_CLASS, "classes": CLASSES, "seconds": round(time.perf_counter() - t0, 1)}
    marker.write_text(json.dumps(facts) + "\n")
    return facts


def _loader(where: Path, backend: str, device: str, dtype, **knobs):
    """knobs: dali_source and hw_decoder_load (the DALI flags of rn50 train)."""
    from pipeline import DALIOptions, LoaderOptions, Placement, build_loader

    dali = DALIOptions(
        source=knobs.get("dali_source", "auto"),
        hw_decoder_load=knobs.get("hw_decoder_load"),
        feed_thread=knobs.get("feed_thread", False),
    )
    return build_loader(
        where,
        "train",
        batch_size=BATCH,
        resolution=RES,
        placement=Placement(device, dtype),
        options=LoaderOptions(backend, min(8, os.cpu_count() or 1), dali=dali),
        seed=0,
        drop_last=True,
        verbose=False,
    )


def loader_check(
    where: Path, device: str, backend: str, reference_backend: str, dtype: str = "bfloat16", **knobs
) -> dict:
    """Three batches (`dtype`) from the GPU loader, checked; the first still as it was when handed out after two more
    (a batch must not alias buffers the loader reuses); the first against the CPU loader's first batch of the same
    epoch (same seed, so the same samples, boxes and flips)."""
    import torch

    from pipeline.contract import denormalize

    want = getattr(torch, dtype)
    t0 = time.perf_counter()
    gpu = _loader(where, backend, device, want, **knobs)
    made_s = time.perf_counter() - t0
    gpu.set_epoch(0)
    it = iter(gpu)
    t0 = time.perf_counter()
    batches = [next(it)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    first_s = time.perf_counter() - t0
    first = (batches[0][0].clone(), batches[0][1].clone())
    batches += [next(it), next(it)]
    sync()
    it.close()
    expect(
        torch.equal(first[0], batches[0][0]) and torch.equal(first[1], batches[0][1]),
        "the first batch changed after two more were taken: it aliases buffers the loader reuses",
    )
    for i, (x, y) in enumerate(batches):
        expect(tuple(x.shape) == (BATCH, 3, RES, RES), f"batch {i}: images {tuple(x.shape)}")
        expect(x.dtype == want, f"batch {i}: images {x.dtype}, wanted {dtype}")
        expect(x.is_contiguous(memory_format=torch.channels_last), f"batch {i}: not channels_last, {x.stride()}")
        expect(x.device.type == device == y.device.type, f"batch {i}: on {x.device} / {y.device}, wanted {device}")
        expect(y.dtype == torch.int64 and tuple(y.shape) == (BATCH,), f"batch {i}: labels {y.dtype} {tuple(y.shape)}")
        expect(bool(torch.isfinite(x).all()), f"batch {i}: non-finite pixels")
        expect(float(x.float().std()) > 0.05, f"batch {i}: flat images (std {float(x.float().std()):.3g})")
    out = {
        "loader": gpu.describe(),
        "construct_s": round(made_s, 2),
        "build_and_first_batch_s": round(first_s, 2),
        "builds": getattr(gpu, "builds", None),
    }
    gpu.close()
    ref = _loader(
        where,
        reference_backend,
        "cpu",
        torch.float32,
        **({"dali_source": knobs["dali_source"]} if "dali_source" in knobs else {}),
    )
    ref.set_epoch(0)
    rx, ry = next(iter(ref))
    ref.close()
    x, y = batches[0]
    expect(torch.equal(y.cpu(), ry), f"labels differ from the CPU pipeline's: {y.tolist()} vs {ry.tolist()}")
    diff = (denormalize(x.float().cpu()) - denormalize(rx)).abs()
    out.update(
        reference=f"{reference_backend} on the CPU, float32",
        mean_abs_pixel_diff=round(float(diff.mean()), 3),
        max_abs_pixel_diff=round(float(diff.max()), 1),
    )
    expect(
        out["mean_abs_pixel_diff"] <= PIXEL_TOLERANCE,
        f"mean |{device} - CPU| {out['mean_abs_pixel_diff']} > {PIXEL_TOLERANCE} (0..255 scale)",
        out,
    )
    return out


def check_dali_beton(data: Path, device: str) -> dict:
    return loader_check(data / "betons", device, "dali", "dali", dali_source="beton")


def check_dali_fp16(data: Path, device: str) -> dict:
    """float16, the T4's precision: DALI's float16 output is handed out without a cast, so this is where a batch
    could alias DALI's buffers."""
    return loader_check(data / "betons", device, "dali", "dali", dtype="float16", dali_source="beton")


def check_dali_thread(data: Path, device: str) -> dict:
    """The feed thread: the pipeline driven from the loader's own thread, batches copied on its own CUDA stream and
    handed over with an event (pipeline.dali_loader)."""
    return loader_check(data / "betons", device, "dali", "dali", dali_source="beton", feed_thread=True)


def check_dali_hw(load: float):
    def check(data: Path, device: str) -> dict:
        return loader_check(data / "betons", device, "dali", "dali", dali_source="beton", hw_decoder_load=load)

    return check


def check_dali_folder(data: Path, device: str) -> dict:
    return loader_check(data / "folders", device, "dali", "dali", dali_source="folder")


def check_dali_mixed(data: Path, device: str) -> dict:
    from dataset_tools.beton_format import image_column, read_index

    column = image_column(read_index(data / "betons_mixed" / "train.beton"))
    expect(0 < column.num_raw < len(column.labels), f"the half-raw beton holds {column.num_raw} raw samples")
    mixed = loader_check(data / "betons_mixed", device, "dali", "dali", dali_source="beton")
    return {"raw_samples": column.num_raw, **mixed}


def check_ffcv(data: Path, device: str) -> dict:
    return loader_check(data / "betons", device, "ffcv", "ffcv")


def _step_parts(step: str, sgd: str = "foreach", seed: int = 3):
    import torch

    from training.components import make_parts
    from training.config import TrainConfig
    from training.distributed import DistContext
    from training.engine import resolve_precision
    from training.schedules import Schedule

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(seed)
    cfg = TrainConfig(arch="resnet18", step=step, sgd=sgd, weight_decay=5e-4)
    schedule = Schedule(kind="step", max_lr=0.01, steps_per_epoch=4, epochs=1)
    parts, _, _ = make_parts(cfg, 4, DistContext(0, 0, 1, device), resolve_precision("fp32", device), schedule)
    return parts, device


def _batches(device, n: int = 4, res: int = 64):
    import torch

    g = torch.Generator(device=device).manual_seed(5)
    return [
        (
            torch.randn(32, 3, res, res, device=device, generator=g).contiguous(memory_format=torch.channels_last),
            torch.randint(0, 4, (32,), device=device, generator=g),
        )
        for _ in range(n)
    ]


def compare_steps(a_parts, b_parts, device, what: str, steps: int = 3) -> dict:
    """Run both parts over the same batches: each step's loss within 1e-4 relative, every weight tensor within 5% of
    the distance the reference (a) moved it (tests/test_step.py's tolerance for the compiled step, 3 steps)."""
    import torch

    from training.engine import train_step

    torch.backends.cudnn.allow_tf32 = False  # fp32 both sides: the comparison is of the step, not of TF32 rounding
    torch.backends.cuda.matmul.allow_tf32 = False
    start = [p.detach().clone() for p in a_parts.raw_model.parameters()]
    losses = []
    for step, batch in enumerate(_batches(device, steps)):
        a = train_step(a_parts, [batch], step, device)
        b = train_step(b_parts, [batch], step, device)
        losses.append((float(a[0]), float(b[0])))
    shares = [
        float((x.detach() - y.detach()).norm() / max(float((y.detach() - x0).norm()), 1e-12))
        for x, y, x0 in zip(b_parts.raw_model.parameters(), a_parts.raw_model.parameters(), start, strict=True)
    ]
    out = {"losses (reference, checked)": losses, "max_weight_share": round(max(shares), 5)}
    for step, (la, lb) in enumerate(losses):
        expect(abs(la - lb) <= 1e-4 * abs(la) + 1e-4, f"step {step}: loss {lb} ({what}) vs {la} (reference)", out)
    expect(max(shares) < 0.05, f"weights {max(shares):.3g} of the distance moved away from the reference's", out)
    return out


def check_graphs(data: Path, device: str) -> dict:
    """The capture itself, without compilation: a GraphedStep over the plain module."""
    import copy

    import torch

    from training.graphs import GraphedStep

    ref, device = _step_parts("eager")
    graphed, _ = _step_parts("eager")
    graphed.raw_model.load_state_dict(copy.deepcopy(ref.raw_model.state_dict()))
    graphed.graphed = GraphedStep(
        graphed.raw_model, graphed.raw_model, graphed.optimizer, graphed.precision, graphed.label_smoothing
    )
    t0 = time.perf_counter()
    out = compare_steps(ref, graphed, device, "graphed")
    expect(graphed.graphed is not None and graphed.graphed.captures == 1, f"captures: {graphed.step_why or '?'}")
    torch.cuda.synchronize()
    return {**out, "seconds": round(time.perf_counter() - t0, 1), "capture": "thread_local"}


def check_graphs_compiled(data: Path, device: str) -> dict:
    """The trainer's --step graphs: compile, then capture."""
    ref, device = _step_parts("eager")
    graphed, _ = _step_parts("graphs")
    graphed.raw_model.load_state_dict(ref.raw_model.state_dict())
    t0 = time.perf_counter()
    out = compare_steps(ref, graphed, device, "compiled + graphed")
    expect(graphed.step_mode == "graphs", f"fell back: {graphed.step_why}")
    return {**out, "seconds": round(time.perf_counter() - t0, 1), "mode": graphed.step_mode}


def check_fused_sgd(data: Path, device: str) -> dict:
    from training.model import sgd_kernels

    ref, device = _step_parts("eager", sgd="foreach")
    fused, _ = _step_parts("eager", sgd="fused")
    fused.raw_model.load_state_dict(ref.raw_model.state_dict())
    expect(sgd_kernels(fused.optimizer) == "fused", f"SGD kernels: {sgd_kernels(fused.optimizer)}")
    return compare_steps(ref, fused, device, "fused SGD")


def check_sync(data: Path, device: str) -> dict:
    from benchmarks.sync_check import check

    r = check("bf16", "eager", "resnet18", 128, 64, 5, 4)
    expect(r["synchronisations"] == 0, f"host sync: {r.get('error')} at {r.get('where')}")
    return r


FUNCTIONS = {
    "env": check_env,
    "data": check_data,
    "dali-beton": check_dali_beton,
    "dali-mixed": check_dali_mixed,
    "dali-fp16": check_dali_fp16,
    "dali-thread": check_dali_thread,
    "dali-hw0": check_dali_hw(0.0),
    "dali-hw0.99": check_dali_hw(0.99),
    "dali-folder": check_dali_folder,
    "ffcv": check_ffcv,
    "graphs": check_graphs,
    "fused-sgd": check_fused_sgd,
    "sync": check_sync,
    "graphs-compiled": check_graphs_compiled,
}

# ---------------------------------------------------------------------------------------------------- the harness


PROBES = {
    "cuda": ("import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)", "a CUDA device"),
    "dali": ("import nvidia.dali", "DALI (nvidia.dali)"),
    "ffcv": ("import ffcv", "FFCV"),
}


def probe(need: str) -> bool:
    """Is `need` here? Asked in a subprocess: importing ffcv costs seconds and changes torch's thread count."""
    return subprocess.run([sys.executable, "-c", PROBES[need][0]], capture_output=True, timeout=120).returncode == 0


def missing_needs(needs: tuple[str, ...], passed: set[str], have: dict[str, bool]) -> list[str]:
    """What of `needs` is not here: a package that does not import, no CUDA device (each probed once, the answers
    kept in `have`), or the data check not passed."""
    missing = []
    for need in needs:
        if need == "data":
            if "data" not in passed:
                missing.append("the data check")
            continue
        if need not in have:
            have[need] = probe(need)
        if not have[need]:
            missing.append(PROBES[need][1])
    return missing


def check_function(name: str):
    """A built-in check, or "module:function" for one of your own (called with (data folder, device))."""
    if name in FUNCTIONS:
        return FUNCTIONS[name]
    import importlib

    module, function = name.split(":", 1)
    return getattr(importlib.import_module(module), function)


def run_child(name: str, data: Path, device: str, result: Path, timeout: float) -> int:
    """In the check's own process: dump every thread's stack shortly before the parent's timeout, run the check,
    write {"details"} or {"error"} (the full traceback, chained causes included) to `result`."""
    from pipeline.contract import error_chain

    faulthandler.enable()
    faulthandler.dump_traceback_later(max(1.0, timeout - 5), exit=False)
    try:
        details = check_function(name)(data, device)
        payload = {"status": "PASS", "details": details}
    except BaseException as e:  # every failure, KeyboardInterrupt included, is the check's result
        payload = {"status": "FAIL", "error": "".join(traceback.format_exception(e)), "summary": error_chain(e)}
        if getattr(e, "details", None) is not None:
            payload["details"] = e.details
    finally:
        faulthandler.cancel_dump_traceback_later()
    result.write_text(json.dumps(payload, default=str))
    return 0 if payload["status"] == "PASS" else 1


def run_check(name: str, data: Path, device: str, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-X", "faulthandler", "-m", "benchmarks.gpu_smoke", "--child", name]
        cmd += ["--data", str(data), "--device", device, "--result", str(result), "--timeout", str(timeout)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        seconds = round(time.perf_counter() - t0, 1)
        text = output.decode(errors="replace")
        if result.is_file():
            payload = json.loads(result.read_text())
        elif timed_out:
            payload = {"status": "TIMEOUT", "summary": f"no result after {timeout:.0f} s (stacks in the output)"}
        else:
            payload = {"status": "FAIL", "summary": f"the check's process ended with {proc.returncode} and no result"}
    return {"check": name, **payload, "seconds": seconds, "output": text[-20000:]}


def record(out: Path, results: list[dict], r: dict) -> None:
    """Append one check to smoke.log, rewrite smoke.json: what ended is on disk before the next check starts."""
    results.append(r)
    line = f"{r['check']:16s} {r['status']:7s} {r['seconds']:6.1f} s  {r.get('summary') or ''}".rstrip()
    print(line, flush=True)
    with open(out / "smoke.log", "a") as f:
        f.write(f"==== {line}\n")
        if r.get("details") is not None:
            f.write(json.dumps(r["details"], indent=1, default=str) + "\n")
        if r.get("error"):
            f.write(r["error"])
        if r["status"] != "PASS" and r.get("output"):
            f.write("---- output\n" + r["output"] + "\n")
    tmp = out / ".smoke.json.tmp"
    tmp.write_text(json.dumps({"checks": results}, indent=1, default=str) + "\n")
    os.replace(tmp, out / "smoke.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rn50 bench smoke",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_smoke_out", help="results folder ($OUT if set)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"the smoke data's folder ({DEFAULT_DATA})")
    p.add_argument(
        "--checks",
        default="all",
        help=f"comma-separated, of: {', '.join(CHECKS)}, or module:function for a check of your own (all)",
    )
    p.add_argument("--timeout", type=float, default=120, help="seconds per check before it is killed (120)")
    p.add_argument(
        "--device",
        default="cuda",
        choices=("cuda", "cpu"),
        help="cpu: the loader checks on the CPU (DALI's CPU pipeline), to try the harness without a GPU (cuda)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = Path(args.data)
    if args.child:
        code = run_child(args.child, data, args.device, Path(args.result), args.timeout)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the result is written: no waiting on DALI's or FFCV's threads at interpreter exit
    names = list(CHECKS) if args.checks == "all" else [c for c in args.checks.split(",") if c]
    unknown = [c for c in names if c not in CHECKS and ":" not in c]
    if unknown:
        print(f"gpu_smoke: error: unknown checks {', '.join(unknown)}; known: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    passed = {"data"} if "data" not in names and (data / "smoke_data.json").is_file() else set()
    have: dict[str, bool] = {}
    for name in names:
        needs = CHECKS.get(name, ())
        if args.device == "cpu" and name in CPU_TOO:
            needs = tuple(n for n in needs if n != "cuda")
        missing = missing_needs(needs, passed, have)
        if missing:
            record(
                out,
                results,
                {"check": name, "status": "SKIP", "seconds": 0.0, "summary": "needs " + ", ".join(missing)},
            )
            continue
        r = run_check(name, data, args.device, args.timeout)
        if r["status"] == "PASS":
            passed.add(name)
        record(out, results, r)
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "TIMEOUT", "SKIP")}
    print("gpu_smoke: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + f" (details: {out}/smoke.log)")
    return 0 if counts["FAIL"] == counts["TIMEOUT"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
