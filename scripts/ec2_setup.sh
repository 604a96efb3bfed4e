#!/usr/bin/env bash
# From a fresh EC2 GPU instance to training, in one script (Ubuntu 22.04/24.04 with the NVIDIA driver, e.g. the AWS
# Deep Learning Base AMI; g4dn.* for the T4 budget run, p4d/p5 for 8 GPUs).
#
#   git clone <this repo> rn50 && cd rn50
#   bash scripts/ec2_setup.sh                                    # checks + make setup
#   IMAGENET=/data/imagenet BETONS=/data/betons bash scripts/ec2_setup.sh     # ... + sort val/ + convert
#   NVME=1 IMAGENET=... BETONS=/mnt/nvme/betons bash scripts/ec2_setup.sh     # ... on the local NVMe disk
#
# IMAGENET must hold train/<wnid>/ and val/ (flat val/ is sorted with LOC_val_solution.csv when it sits in IMAGENET,
# as in the Kaggle release). The betons take about 355 GB (ffcv-imagenet's settings: 500 px, half JPEG q90).
# NVME=1 formats and mounts the first unused instance-store NVMe disk at /mnt/nvme (its data is lost when the instance
# stops: keep checkpoints elsewhere, e.g. OUT=/mnt/efs/rn50 for scripts/train_*.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf '[ec2_setup] %s\n' "$*"; }
die() { printf '[ec2_setup] error: %s\n' "$*" >&2; exit 1; }

# --- 1. the GPU
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/[ec2_setup] GPU /'
else
  say "warning: no nvidia-smi: no NVIDIA driver on this machine; training would run on the CPU"
fi

# --- 2. optional local NVMe (instance store) for the betons
if [ -n "${NVME:-}" ] && ! mountpoint -q /mnt/nvme; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  disk=$(lsblk -dpno NAME,TYPE,MOUNTPOINT | awk '$2=="disk" && $3=="" {print $1}' | grep nvme | while read -r d; do
           [ -z "$(lsblk -no MOUNTPOINT "$d" | tr -d '[:space:]')" ] && ! $SUDO blkid "$d" >/dev/null 2>&1 && echo "$d"
         done | head -n1)
  [ -n "$disk" ] || die "NVME=1 but no unused, unformatted NVMe disk found (lsblk)"
  say "formatting $disk and mounting it at /mnt/nvme"
  $SUDO mkfs.ext4 -q -F "$disk"
  $SUDO mkdir -p /mnt/nvme
  $SUDO mount -o noatime "$disk" /mnt/nvme
  $SUDO chown "$(id -u):$(id -g)" /mnt/nvme
fi

# --- 3. system packages, venv, project (idempotent)
make setup
RN50=.venv/bin/rn50
.venv/bin/python - <<'PY'
import torch
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        print(f"[ec2_setup] torch sees cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {cap[0]}.{cap[1]}: "
              f"--precision auto -> {'bf16' if cap[0] >= 8 else 'fp16 + GradScaler'}")
else:
    print("[ec2_setup] warning: torch sees no CUDA device (driver/CUDA mismatch?); rn50 train would use the CPU")
PY

# --- 4. optional data preparation
if [ -n "${IMAGENET:-}" ]; then
  [ -n "${BETONS:-}" ] || die "IMAGENET is set but BETONS (where the .beton files go) is not"
  [ -d "$IMAGENET/train" ] || die "$IMAGENET/train not found (expected train/<wnid>/*.JPEG)"
  mkdir -p "$BETONS"
  free_gb=$(df -Pk "$BETONS" | awk 'NR==2 {print int($4/1024/1024)}')
  [ "$free_gb" -ge 360 ] || say "warning: $BETONS has ${free_gb} GB free; full ImageNet betons need about 355 GB"
  if [ -n "$(find "$IMAGENET/val" -maxdepth 1 -type f -iname '*.jpeg' -print -quit 2>/dev/null)" ]; then
    csv=$IMAGENET/LOC_val_solution.csv
    [ -f "$csv" ] || die "$IMAGENET/val is flat and $csv is missing: sort it with rn50 organize-val first"
    "$RN50" organize-val "$IMAGENET/val" --csv "$csv"
  fi
  if [ -f "$BETONS/train.beton" ] && [ -f "$BETONS/val.beton" ]; then
    say "$BETONS already has train.beton and val.beton; not converting again"
  else
    "$RN50" convert --data-dir "$IMAGENET" --out-dir "$BETONS" --workers "$(nproc)"
  fi
  "$RN50" inspect "$BETONS/val.beton" | tail -n 5
fi

say "ready. Next:"
say "  source .venv/bin/activate"
say "  rn50 lr-find --config t4_budget --data-dir \${BETONS:-/data/betons}       # optional"
say "  bash scripts/train_t4_budget.sh \${BETONS:-/data/betons}                  # one T4"
say "  bash scripts/train_8gpu.sh \${BETONS:-/data/betons} 40                     # 8 GPUs"
