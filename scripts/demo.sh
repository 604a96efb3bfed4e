#!/usr/bin/env bash
# `make demo`: the whole tool chain on generated data, on any machine (CPU is enough).
#   bash scripts/demo.sh [OUT]    (default demo_out/; rn50 must be on PATH: make demo arranges that)
set -euo pipefail
OUT=${1:-demo_out}
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1. generate a small ImageNet-layout dataset (10 classes, photo-like JPEGs)"
rn50 synth "$OUT/data" --classes 10 --train-per-class 100 --val-per-class 20 --seed 0 --flat-val

step "2. sort the flat val/ folder into class folders, as for the real ILSVRC2012 download"
rn50 organize-val "$OUT/data/val" --csv "$OUT/data/LOC_val_solution.csv"

step "3. convert to FFCV .beton files (ffcv-imagenet's RN50 settings: max side 500, half JPEG q90)"
rn50 convert --data-dir "$OUT/data" --out-dir "$OUT/betons"

step "4. look inside"
rn50 inspect "$OUT/betons/train.beton" --grid "$OUT/betons/train_grid.png"

step "done"
echo "dataset:   $OUT/data  (train/ and val/ class folders)"
echo "betons:    $OUT/betons/{train,val}.beton, classes.json, convert_report.json"
echo "picture:   $OUT/betons/train_grid.png"
