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
source scripts/_launch.sh

DATA=${1:?usage: bash scripts/train_t4_budget.sh BETON_DIR [rn50 train flags...]}
shift
RUN=${RUN:-rn50-t4-budget}
rn50_bin rn50
rn50_train_args t4_budget "$DATA" "$RUN" "${OUT:-.}"
rn50_launch "$BIN/rn50" train "${ARGS[@]}" "$@"
