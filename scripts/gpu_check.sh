#!/usr/bin/env bash
# Every GPU check in one run, one table at the end. For a CUDA machine; on an offline one without FFCV/DALI, bring
# the bundle described in ../shared/gpu/README.md and `source .devbundle/gpu_env.sh` first.
#
#   bash scripts/gpu_check.sh [OUT]            # full: ~8-10 min on an H100/H200 (torch.compile takes ~1 min a shape)
#   QUICK=1 bash scripts/gpu_check.sh [OUT]    # ~3 min: 160 px only, no compiled keep-up
#   knobs: RES=160,192,224 BS=256 WORKERS=$(nproc) ARCH=resnet50 CLASSES=20 PER_CLASS=160 BENCH_ARGS="--steps 10"
#
# What it runs (each writes JSON + Markdown under OUT/, and a PNG when matplotlib is there):
#   1. generated ImageNet-like data (synth, 20 classes) converted to .beton
#   2. rn50 bench step   at 160/192/224 px, eager and torch.compile
#   3. rn50 bench loader ffcv (ours and a plain FFCV Loader), dali, torchvision at the same resolutions
#   4. rn50 bench keepup every backend feeding the eager (and compiled) step at 160 px
#   5. the summary table (OUT/summary.md)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-160,192,224}; BS=${BS:-256}; WORKERS=${WORKERS:-$(nproc)}; ARCH=${ARCH:-resnet50}
CLASSES=${CLASSES:-20}; PER_CLASS=${PER_CLASS:-160}; read -r -a EXTRA <<< "${BENCH_ARGS:-}"
[ -n "${QUICK:-}" ] && RES=160
rn50() { "$PY" -m training.cli "$@"; }
mkdir -p "$OUT"
failures=()
run() { local name=$1; shift; echo "== $name: $*"; "$@" || failures+=("$name"); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PY'
import importlib
for m in ("torch", "torchvision", "numpy", "PIL", "tqdm", "yaml", "psutil", "matplotlib", "cv2", "numba", "ffcv", "nvidia.dali"):
    try:
        importlib.import_module(m); print(f"  {m:12s} ok")
    except Exception as e:
        print(f"  {m:12s} MISSING ({type(e).__name__}: {str(e)[:60]})")
import torch; print("  cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

if [ ! -f "$OUT/betons/train.beton" ]; then
  run synth rn50 synth "$OUT/data" --classes "$CLASSES" --train-per-class "$PER_CLASS" --val-per-class 5 --seed 0
  run convert rn50 convert --data-dir "$OUT/data" --out-dir "$OUT/betons" --splits train --no-progress
fi
run step-eager rn50 bench step --res "$RES" --batch-size "$BS" --arch "$ARCH" "${EXTRA[@]}" --out "$OUT/step_eager"
[ -z "${QUICK:-}" ] && run step-compiled rn50 bench step --res "$RES" --batch-size "$BS" --arch "$ARCH" "${EXTRA[@]}" \
    --compile --out "$OUT/step_compiled"
run loader rn50 bench loader --data-dir "$OUT/betons" --image-folder "$OUT/data" --backend all --res "$RES" \
    --batch-size "$BS" --workers "$WORKERS" --epochs 3 --out "$OUT/loader"
run keepup-eager rn50 bench keepup --data-dir "$OUT/betons" --image-folder "$OUT/data" --backend all --res 160 \
    --batch-size "$BS" --workers "$WORKERS" --arch "$ARCH" "${EXTRA[@]}" --out "$OUT/keepup_eager"
[ -z "${QUICK:-}" ] && run keepup-compiled rn50 bench keepup --data-dir "$OUT/betons" --image-folder "$OUT/data" \
    --backend ffcv,dali --res 160 --batch-size "$BS" --workers "$WORKERS" --arch "$ARCH" "${EXTRA[@]}" --compile \
    --out "$OUT/keepup_compiled"
"$PY" -m benchmarks.summary "$OUT"
[ ${#failures[@]} -eq 0 ] || { echo "failed steps: ${failures[*]}"; exit 1; }
