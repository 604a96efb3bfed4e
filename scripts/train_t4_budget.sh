#!/usr/bin/env bash
# ResNet-50 on a single T4 (configs/t4_budget.yaml: 24 epochs, fp16, progressive 160 -> 192 px, LR 0.106 at batch
# 256). Meant for a spot instance: run the same line again after an interruption and it resumes (--resume auto) from
# the last checkpoint, written every 10 minutes inside an epoch (checkpoint_minutes in the preset).
#
#   bash scripts/train_t4_budget.sh /data/betons
#   bash scripts/train_t4_budget.sh /data/betons --batch-size 192     # if 256 does not fit; the LR follows
#   OUT=/mnt/efs/rn50 bash scripts/train_t4_budget.sh /data/betons    # keep checkpoints off the instance disk
#
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${1:?usage: bash scripts/train_t4_budget.sh BETON_DIR [rn50 train flags...]}
shift
RUN=${RUN:-rn50-t4-budget}
OUT=${OUT:-.}
BIN=${RN50_VENV:-.venv}/bin
[ -x "$BIN/rn50" ] || BIN=$(dirname "$(command -v rn50 || echo /missing/rn50)")
[ -x "$BIN/rn50" ] || [ -n "${DRY_RUN:-}" ] || { echo "no rn50 command: run make setup (or activate the venv)" >&2; exit 2; }

args=(--config t4_budget --data-dir "$DATA" --run-name "$RUN" --output-dir "$OUT")
# --resume auto: continue checkpoints/<run>/checkpoint.pt when it exists, else start.
args+=(--resume auto)
cmd=("$BIN/rn50" train "${args[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; exit 0; fi
exec "${cmd[@]}"
