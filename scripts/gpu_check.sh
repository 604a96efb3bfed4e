#!/usr/bin/env bash
# The GPU proof in one run: does each loader path keep up with the COMPILED ResNet-50 step? For one CUDA machine.
# On an offline machine without FFCV/DALI, bring the bundle described in ../shared/gpu/README.md first and
# `source .devbundle/gpu_env.sh` (DALI arrives in parts over several runs; this script needs it installed).
#
#   bash scripts/gpu_check.sh [OUT]              # full: 160/192/224 px + knob sweeps (budget: ~8 min, H200, 16 cores)
#   PART=step bash scripts/gpu_check.sh [OUT]    # the step's levers instead (rn50 bench step; ~6-8 min, see below)
#   QUICK=1 bash scripts/gpu_check.sh [OUT]      # 160 px + the hw_decoder_load sweep (budget: ~4 min)
#   DATA=/tmp/rn50_bench bash scripts/gpu_check.sh "$OUT/gpu_check"   # data (~3 GB) outside a folder sent back
#   knobs: RES=160,192,224 BS=256 WORKERS=$(nproc) UNIQUE=2000 SAMPLES=56000 BUDGET_S=420 PROOF_ARGS="--window 300"
#
# What it runs:
#   1. python -m benchmarks.bench_data: UNIQUE distinct `rn50 synth` images (ImageNet-like, short side 300-500 px),
#      converted all-JPEG and repeated to SAMPLES train samples (56,000 = 218 batches of 256: a 200-batch window
#      fits inside one epoch after 10 warm-up batches); the same images as hard-linked folders; a half-raw beton.
#   2. python -m benchmarks.gpu_proof: per resolution, the step compiled once, timed alone and fed by DALI from the
#      beton, DALI from the folders and the ffcv backend (each loader also alone); then the hw_decoder_load,
#      DALI threads and prefetch sweeps, a plain FFCV Loader and DALI on the half-raw beton. CPU cores per row.
#      It skips (and names) what would start after BUDGET_S seconds.
#   3. the reference file benchmarks/reference/<card>_<date>.json (tracked; a copy lands in OUT/) and its tables.
#      Commit it, then: python -m benchmarks.reference --write README.md
#   4. python -m benchmarks.sync_check --steps eager (~15 s: every augmentation on, bf16 and fp16, no host sync in a
#      step); SYNC_CHECK=full adds the compiled and graphed steps (a compilation each), SYNC_CHECK=0 skips it.
# PART=step (one lent session cannot hold both parts: a compilation costs ~1 min a shape) runs instead
#   rn50 bench step --levers $STEP_LEVERS --res $STEP_RES --precision bf16 --reference: one row per lever against the
#   compiled step (default levers eager,compile,graphs,fused,bs384,best at 224 px; STEP_LEVERS=all for every one),
#   recorded in the same reference file, then the sync check of the compiled and graphed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
DATA=${DATA:-$OUT/data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-160,192,224}; BS=${BS:-256}; WORKERS=${WORKERS:-$(nproc)}; UNIQUE=${UNIQUE:-2000}
SAMPLES=${SAMPLES:-56000}; BUDGET_S=${BUDGET_S:-420}; read -r -a EXTRA <<< "${PROOF_ARGS:-}"
SWEEPS=hw_decoder_load,dali_threads,dali_prefetch,extras
if [ -n "${QUICK:-}" ]; then RES=160; SWEEPS=hw_decoder_load; BUDGET_S=${BUDGET_S_QUICK:-200}; fi
mkdir -p "$OUT"
start=$(date +%s)

if [ "${PART:-loaders}" = step ]; then
  STEP_LEVERS=${STEP_LEVERS:-eager,compile,graphs,fused,bs384,best}; STEP_RES=${STEP_RES:-224}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cores: $(nproc) usable; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  "$PY" -m training.cli bench step --levers "$STEP_LEVERS" --res "$STEP_RES" --precision bf16 --batch-size "$BS" \
    --best-batch "${BEST_BATCH:-$BS}" --out "$OUT/step" --reference 2>&1 | tee "$OUT/step.log"
  rc=${PIPESTATUS[0]}
  newest=$(ls -t benchmarks/reference/*.json 2>/dev/null | head -n 1)
  [ -n "$newest" ] && cp "$newest" "$OUT/"
  "$PY" -m benchmarks.sync_check --steps compile,graphs --precision bf16 --json "$OUT/sync_check.json" || rc=1
  echo "gpu_check (step): $(( $(date +%s) - start )) s in all"
  exit "$rc"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PY' || { echo "gpu_check: torch, ffcv or DALI missing (see above)"; exit 2; }
import importlib, sys
missing = []
for m in ("torch", "numpy", "PIL", "psutil", "numba", "ffcv", "nvidia.dali"):
    try:
        mod = importlib.import_module(m); print(f"  {m:12s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m:12s} MISSING ({type(e).__name__}: {str(e)[:60]})"); missing.append(m)
import torch
print("  cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
PY
echo "cores: $(nproc) usable; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"

echo "== data: $DATA"
"$PY" -m benchmarks.bench_data "$DATA" --unique "$UNIQUE" --samples "$SAMPLES" --classes 100 --workers "$WORKERS" \
  || { echo "gpu_check: making the data failed"; exit 1; }
echo "== proof (budget ${BUDGET_S} s; data took $(( $(date +%s) - start )) s)"
"$PY" -m benchmarks.gpu_proof --data "$DATA" --res "$RES" --batch-size "$BS" --workers "$WORKERS" \
  --sweeps "$SWEEPS" --budget-s "$BUDGET_S" "${EXTRA[@]}" 2>&1 | tee "$OUT/gpu_proof.log"
rc=${PIPESTATUS[0]}
newest=$(ls -t benchmarks/reference/*.json 2>/dev/null | head -n 1)
if [ -n "$newest" ]; then
  cp "$newest" "$OUT/" && cp "$DATA/dataset.json" "$OUT/dataset.json"
  echo "reference file: $newest (copy in $OUT/); commit it, then: python -m benchmarks.reference --write README.md"
fi
case "${SYNC_CHECK:-eager}" in
  0) ;;
  full) "$PY" -m benchmarks.sync_check --json "$OUT/sync_check.json" || rc=1 ;;
  *) "$PY" -m benchmarks.sync_check --steps eager --json "$OUT/sync_check.json" || rc=1 ;;
esac
echo "gpu_check: $(( $(date +%s) - start )) s in all"
exit "$rc"
