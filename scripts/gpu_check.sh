#!/usr/bin/env bash
# Every GPU check of this project, for one CUDA machine, in parts that each fit a lent machine's 10-minute call. On an
# offline machine without FFCV/DALI, `source .devbundle/gpu_env.sh` first (../shared/gpu/README.md; the README's
# "GPU checks" section has the visit plan: which part in which call).
#
#   PART=prep  bash scripts/gpu_check.sh [OUT]   # needs neither FFCV nor DALI: environment, graph capture, fused SGD,
#                                                # host-sync smoke checks; the benchmark's image folders into DATA
#   PART=smoke bash scripts/gpu_check.sh [OUT]   # every smoke check (SMOKE_CHECKS=a,b to choose)
#   QUICK=1    bash scripts/gpu_check.sh [OUT]   # the loader smoke checks, then the proof at 160 px + the half-raw
#                                                # beton + the hw_decoder_load sweep (budget ~7 min, smoke included)
#              bash scripts/gpu_check.sh [OUT]   # the loader smoke checks, then the proof at 160/192/224 px + sweeps
#   PART=step  bash scripts/gpu_check.sh [OUT]   # the step's levers (rn50 bench step), then the sync check
#   PART=cores bash scripts/gpu_check.sh [OUT]   # the loaders alone at 16,12,8,4,2 logical CPUs (rn50 bench loader
#                                                # --cores): ffcv and DALI from the beton at 160/224 px, within 540 s
#
# OUT: the first argument, else $OUT (what a lent machine sends back), else gpu_check_out. At most 8 files land there:
#   gpu_check.log (everything printed), smoke.log + smoke.json (each check's PASS/FAIL/TIMEOUT/SKIP and full error),
#   gpu_proof.json (everything measured and skipped, rewritten after every row), the reference file this run wrote
#   (<card>_<date>.json: commit it into benchmarks/reference/, then python -m benchmarks.reference --write README.md),
#   dataset.json, sync_check.json; PART=step: step/ (json, md, png) instead of the proof's files; PART=cores: cores/
#   (loader.json, .md, .png), dataset.json and the reference file (its loader_cores part).
# DATA (default /tmp/rn50_bench, ~3.5 GB, outside OUT): made once by python -m benchmarks.bench_data and reused.
# Each Python part runs under `timeout` with faulthandler on: a hang prints every thread's stack (SIGABRT), then the
# next part runs. Knobs: RES=160,192,224 BS=256 WORKERS=$(nproc) UNIQUE=2000 SAMPLES=56000 BUDGET_S=420 (counted from
# this script's start, data included) PROOF_ARGS="--window 300" SMOKE_TIMEOUT=120 SMOKE_LIMIT=300
# SMOKE_ARGS="--device cpu" (the loader checks on the CPU: trying the script without a GPU) SYNC_CHECK=eager|full|0
# STEP_LEVERS=eager,compile,graphs,fused,bs384,best STEP_RES=224. PART=cores: CORES=16,12,8,4,2 (those up to nproc;
# the slowest, fewest CPUs, last: what the budget cuts) CORES_RES=160,224 CORES_BACKENDS=ffcv,dali-beton CORES_BATCHES=40 (timed per pass,
# after 5 untimed; 3 passes per row, the first apart) CORES_BUDGET_S=540 (from this script's start, data included);
# trying it without a GPU: CORES_ARGS="--device cpu" CORES_KEEP="--record DIR" (a CPU record, not a reference file).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-gpu_check_out}}
DATA=${DATA:-/tmp/rn50_bench}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
RES=${RES:-160,192,224}; BS=${BS:-256}; WORKERS=${WORKERS:-$(nproc)}; UNIQUE=${UNIQUE:-2000}
SAMPLES=${SAMPLES:-56000}; BUDGET_S=${BUDGET_S:-420}; read -r -a EXTRA <<< "${PROOF_ARGS:-}"
read -r -a SMOKE_EXTRA <<< "${SMOKE_ARGS:-}"; read -r -a CORES_EXTRA <<< "${CORES_ARGS:-}"
read -r -a CORES_KEEP <<< "${CORES_KEEP:---reference benchmarks/reference}"
SWEEPS=mixed,hw_decoder_load,dali_threads,dali_prefetch,plain-ffcv
if [ -n "${QUICK:-}" ]; then RES=160; SWEEPS=mixed,hw_decoder_load; BUDGET_S=${BUDGET_S_QUICK:-400}; fi
PART=${PART:-loaders}
TORCH_ONLY=env,graphs,fused-sgd,sync
LOADER_CHECKS=data,dali-beton,dali-mixed,dali-fp16,dali-thread,dali-hw0,dali-hw0.99,dali-folder,ffcv
mkdir -p "$OUT" || { echo "gpu_check: cannot make $OUT"; exit 2; }
start=$(date +%s)
rc=0

# run SECONDS NAME CMD...: one part under a hard timeout; a hang prints its stacks (faulthandler on SIGABRT)
run() {
  local limit=$1 name=$2; shift 2
  echo "== $name ($(( $(date +%s) - start )) s in)"
  timeout -s ABRT -k 15 "$limit" "$@"
  local code=$?
  case $code in
    0) ;;
    124|134|137) echo "gpu_check: $name stopped after its ${limit} s (stacks above)"; rc=1 ;;
    *) echo "gpu_check: $name ended with $code"; rc=1 ;;
  esac
  return 0
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cores: $(nproc) usable; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  "$PY" - <<'PY'
import importlib
for m in ("torch", "numpy", "PIL", "psutil", "numba", "ffcv", "nvidia.dali"):
    try:
        mod = importlib.import_module(m); print(f"  {m:12s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"  {m:12s} MISSING ({type(e).__name__}: {str(e)[:80]}): what needs it is skipped and named")
PY
}

smoke() {  # smoke CHECKS: each check under SMOKE_TIMEOUT, all of them under SMOKE_LIMIT
  run "${SMOKE_LIMIT:-300}" "smoke $1" "$PY" -m benchmarks.gpu_smoke --out "$OUT" --checks "$1" \
    --timeout "${SMOKE_TIMEOUT:-120}" "${SMOKE_EXTRA[@]}"
}

sync_check() {  # sync_check STEPS
  local limit=120; [ "$1" = eager ] || limit=400
  run "$limit" "sync check ($1)" "$PY" -m benchmarks.sync_check --steps "$1" --json "$OUT/sync_check.json"
}

main() {
machine
case "$PART" in
  prep)
    smoke "${SMOKE_CHECKS:-$TORCH_ONLY}"
    run 300 "benchmark folders" "$PY" -m benchmarks.bench_data "$DATA" --stage folders --unique "$UNIQUE" \
      --samples "$SAMPLES" --classes 100 --workers "$WORKERS"
    ;;
  smoke)
    smoke "${SMOKE_CHECKS:-all}"
    ;;
  step)
    STEP_LEVERS=${STEP_LEVERS:-eager,compile,graphs,fused,bs384,best}; STEP_RES=${STEP_RES:-224}
    run 580 "step levers" "$PY" -m training.cli bench step --levers "$STEP_LEVERS" --res "$STEP_RES" \
      --precision bf16 --batch-size "$BS" --best-batch "${BEST_BATCH:-$BS}" --out "$OUT/step" --reference \
      --copy-to "$OUT"
    [ "${SYNC_CHECK:-full}" = 0 ] || sync_check compile,graphs
    ;;
  cores)
    CORES_BUDGET_S=${CORES_BUDGET_S:-540}
    CORES=${CORES:-$(for n in 16 12 8 4 2; do [ "$n" -le "$(nproc)" ] && printf '%s,' "$n"; done | sed 's/,$//')}
    run 300 "benchmark data: $DATA" "$PY" -m benchmarks.bench_data "$DATA" --unique "$UNIQUE" --samples "$SAMPLES" \
      --classes 100 --workers "$WORKERS"
    [ -f "$DATA/dataset.json" ] && cp "$DATA/dataset.json" "$OUT/dataset.json"
    left=$(( CORES_BUDGET_S - ($(date +%s) - start) ))
    run $(( left > 60 ? left + 30 : 90 )) "loaders by logical CPUs ($CORES; ${left} s left)" \
      "$PY" -m training.cli bench loader --data-dir "$DATA/betons" --backend "${CORES_BACKENDS:-ffcv,dali-beton}" \
      --res "${CORES_RES:-160,224}" --cores "$CORES" --batch-size "$BS" --dtype bfloat16 --warmup 5 \
      --batches "${CORES_BATCHES:-40}" --epochs 3 --budget-s "$CORES_BUDGET_S" --started-at "$start" \
      --out "$OUT/cores" "${CORES_KEEP[@]}" --copy-to "$OUT" "${CORES_EXTRA[@]}"
    ;;
  loaders)
    [ "${SMOKE:-1}" = 0 ] || smoke "${SMOKE_CHECKS:-$LOADER_CHECKS}"
    run 300 "benchmark data: $DATA" "$PY" -m benchmarks.bench_data "$DATA" --unique "$UNIQUE" --samples "$SAMPLES" \
      --classes 100 --workers "$WORKERS"
    [ -f "$DATA/dataset.json" ] && cp "$DATA/dataset.json" "$OUT/dataset.json"
    left=$(( BUDGET_S - ($(date +%s) - start) ))
    run $(( left > 60 ? left + 60 : 120 )) "proof (budget ${BUDGET_S} s from the start: ${left} s left)" \
      "$PY" -m benchmarks.gpu_proof --data "$DATA" --res "$RES" --batch-size "$BS" --workers "$WORKERS" \
      --sweeps "$SWEEPS" --budget-s "$BUDGET_S" --started-at "$start" --copy-to "$OUT" --json "$OUT/gpu_proof.json" \
      "${EXTRA[@]}"
    case "${SYNC_CHECK:-eager}" in
      0) ;;
      full) sync_check eager,compile,graphs ;;
      *) sync_check eager ;;
    esac
    ;;
  *) echo "gpu_check: PART is prep, smoke, loaders, step or cores, not $PART"; return 2 ;;
esac
echo "gpu_check ($PART): $(( $(date +%s) - start )) s in all; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
return "$rc"
}

main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
