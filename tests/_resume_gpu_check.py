"""GPU check of mid-epoch resume (run by hand on a CUDA machine; the CPU tests cover the rest):

    python tests/_resume_gpu_check.py OUT_DIR

For bf16 and fp16 (GradScaler), each with and without --deterministic: an uninterrupted run, and a run that gets
SIGTERM after its 3rd optimizer step and is resumed. Reports the exit codes, where the stop landed, and how far the
final weights of the two are apart (0.0 = bit-identical), as JSON in OUT_DIR/resume_gpu.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    from dataset_tools.synth import synthesize

    data = out / "data"
    synthesize(
        data,
        num_classes=4,
        train_per_class=64,
        val_per_class=16,
        seed=0,
        workers=4,
        min_short=96,
        max_short=128,
        progress=False,
    )
    results = []
    for precision in ("bf16", "fp16"):
        for deterministic in (True, False):
            flags = [
                "--data-dir",
                str(data),
                "--loader",
                "torchvision",
                "--arch",
                "resnet18",
                "--res",
                "64",
                "--val-res",
                "64",
                "--batch-size",
                "32",
                "--workers",
                "4",
                "--epochs",
                "2",
                "--max-lr",
                "0.1",
                "--precision",
                precision,
                "--no-progress",
                "--log-every",
                "2",
                "--checkpoint-every",
                "2",
                "--ema",
                "--mixup",
                "0.2",
                "--cutmix",
                "1.0",
                "--random-erase",
                "0.25",
                "--auto-augment",
                "trivialaugment",
                "--run-name",
                "r",
                "--deterministic" if deterministic else "--no-deterministic",
            ]
            tag = f"{precision}{'_det' if deterministic else ''}"
            runs = {}
            for name, spec, extra in (
                ("full", "{}", []),
                ("stopped", '{"event": "step", "n": 3, "signal": "TERM"}', []),
                ("resumed", "{}", ["--resume"]),
            ):
                t0 = time.perf_counter()
                r = subprocess.run(
                    [
                        sys.executable,
                        str(REPO / "tests" / "_resume_runner.py"),
                        spec,
                        "--",
                        *flags,
                        "--output-dir",
                        str(out / tag / ("full" if name == "full" else "split")),
                        *extra,
                    ],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                )
                runs[name] = {
                    "rc": r.returncode,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "tail": (r.stdout + r.stderr)[-600:] if r.returncode not in (0, 143) else "",
                    "stop": [line for line in r.stdout.splitlines() if "received" in line],
                }
            entry = {"precision": precision, "deterministic": deterministic, "runs": runs}
            if runs["full"]["rc"] == 0 and runs["resumed"]["rc"] == 0:
                a = torch.load(out / tag / "full" / "checkpoints" / "r" / "checkpoint.pt", weights_only=True)
                b = torch.load(out / tag / "split" / "checkpoints" / "r" / "checkpoint.pt", weights_only=True)
                diffs = [
                    (a["model"][k].double() - b["model"][k].double()).abs().max().item()
                    for k in a["model"]
                    if a["model"][k].is_floating_point()
                ]
                entry.update(
                    step=(a["step"], b["step"]),
                    max_abs_weight_diff=max(diffs),
                    identical_tensors=sum(d == 0 for d in diffs),
                    float_tensors=len(diffs),
                    scaler=(a["scaler"], b["scaler"]),
                )
            results.append(entry)
            print(json.dumps(entry)[:800], flush=True)
    (out / "resume_gpu.json").write_text(
        json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
