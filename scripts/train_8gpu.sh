#!/usr/bin/env bash
# ResNet-50 on one node of 8 GPUs with ffcv-imagenet's schedules (configs/rn50_8xa100_<E>ep.yaml).
#
#   bash scripts/train_8gpu.sh /data/betons            # 40 epochs (ffcv-imagenet: 77.2% in 35.6 min on 8 x A100)
#   bash scripts/train_8gpu.sh /data/betons 16         # 16 | 24 | 32 | 40 | 56 | 88 epochs
#   bash scripts/train_8gpu.sh /data/betons 88 --compile --output-dir /mnt/runs
#
# Run the same line again after an interruption: --resume auto continues checkpoints/<run>/checkpoint.pt. A worker
# that fails is restarted by torchrun (MAX_RESTARTS, default 2) and resumes from that checkpoint by itself.
# Fewer GPUs (NGPU=4, or what nvidia-smi shows): batch 512 per GPU stays, the preset's lr_ref_batch (4096) rescales
# the LR linearly to the smaller global batch. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_launch.sh

DATA=${1:?usage: bash scripts/train_8gpu.sh BETON_DIR [EPOCHS] [rn50 train flags...]}
shift
EPOCHS=40
if [ $# -gt 0 ] && [[ $1 != -* ]]; then EPOCHS=$1; shift; fi
rn50_preset train_8gpu.sh "$EPOCHS"
if [ -z "${NGPU:-}" ]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NGPU" -gt 0 ] || { echo "train_8gpu.sh: nvidia-smi lists no GPU; set NGPU=N to override" >&2; exit 2; }
fi
RUN=${RUN:-rn50-${EPOCHS}ep-${NGPU}gpu}
rn50_bin torchrun
rn50_train_args "$CONFIG" "$DATA" "$RUN" "${OUT:-.}"
rn50_launch "$BIN/torchrun" --standalone --nproc_per_node "$NGPU" --max-restarts "${MAX_RESTARTS:-2}" \
  -m training "${ARGS[@]}" "$@"
