#!/usr/bin/env bash
# Several nodes, torchrun's c10d rendezvous. Run the same line on every node (any order, within a few minutes):
#
#   NNODES=2 MASTER_ADDR=10.0.0.1 bash scripts/multinode.sh /data/betons 40
#   NNODES=4 MASTER_ADDR=node0 GPUS=8 OUT=/mnt/shared/rn50 bash scripts/multinode.sh /data/betons 88 --compile
#
# - Every node needs the betons at the same path (a local copy per node is fastest; FFCV reads them at random).
# - Only global rank 0 writes logs and checkpoints, to OUT on its node. Resuming reads them on every node, so put
#   OUT on shared storage (EFS, FSx, NFS) if you want to resume (the script passes --resume auto; torchrun restarts
#   failed workers MAX_RESTARTS times, default 2, and they continue from the checkpoint).
# - The LR follows the global batch: with the rn50_8xa100 presets (lr_ref_batch 4096), 2 nodes x 8 GPUs x 512 =
#   8192 images per step -> LR 3.4. Linear scaling is known to hold up to about 8k images (Goyal et al. 2017);
#   beyond that, lower batch_size per GPU or expect to retune the LR and warm-up (lr_peak_epoch).
# - NCCL picks the network itself; on AWS EFA instances install the aws-ofi-nccl plugin. NCCL_SOCKET_IFNAME=eth0
#   helps when it picks the wrong interface. DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_launch.sh

DATA=${1:?usage: NNODES=N MASTER_ADDR=HOST bash scripts/multinode.sh BETON_DIR [EPOCHS] [rn50 train flags...]}
shift
EPOCHS=40
if [ $# -gt 0 ] && [[ $1 != -* ]]; then EPOCHS=$1; shift; fi
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to a host name or IP every node can reach (the rendezvous runs there)}"
PORT=${MASTER_PORT:-29500}
rn50_preset multinode.sh "$EPOCHS"
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}
[ "${GPUS:-0}" -gt 0 ] || { echo "multinode.sh: no GPU found; set GPUS=N" >&2; exit 2; }
RUN=${RUN:-rn50-${EPOCHS}ep-${NNODES}x${GPUS}gpu}
rn50_bin torchrun
rn50_train_args "$CONFIG" "$DATA" "$RUN" "${OUT:-.}"
rn50_launch "$BIN/torchrun" --nnodes "$NNODES" --nproc_per_node "$GPUS" --max-restarts "${MAX_RESTARTS:-2}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$PORT" --rdzv_id "$RUN" -m training "${ARGS[@]}" "$@"
