#!/usr/bin/env bash
# `make demo`: the whole tool chain on generated data, on any machine (CPU is enough; ~4 min on 2 cores).
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

step "5. LR range test: a short sweep with the demo's model, loader and batch"
# a second `make demo` starts the demo run afresh (the trainer refuses to overwrite a run without --resume)
rm -rf "$OUT"/logs/demo "$OUT"/runs/demo "$OUT"/checkpoints/demo "$OUT"/lr_finder_plots "$OUT"/lr_suggestion_demo.json
rn50 lr-find --config demo --data-dir "$OUT/betons" --output-dir "$OUT" --run-name demo --num-iter 40 \
  --start-lr 1e-3 --end-lr 10 --smooth 0.9

# The reference workflow: the finder's suggested_max_lr becomes OneCycle's --max-lr.
MAX_LR=$(python - "$OUT/lr_suggestion_demo.json" <<'PY'
import json, sys
print(json.load(open(sys.argv[1]))["suggested_max_lr"])
PY
)
echo "suggested max LR: $MAX_LR"

step "6. train a ResNet-18 for 5 epochs on the CPU (OneCycle peaking at the suggested LR, BlurPool, 64->80 px, TTA)"
rn50 train --config demo --data-dir "$OUT/betons" --output-dir "$OUT" --run-name demo --max-lr "$MAX_LR"

step "7. evaluate the best checkpoint"
rn50 eval --checkpoint "$OUT/checkpoints/demo/best.pt" --data-dir "$OUT/betons" --workers 2 --batch-size 64

step "8. export the model: weights, a torch.export program and a model card, usable without this project"
rn50 export "$OUT/checkpoints/demo/best.pt" --out "$OUT/export" --overwrite

step "done"
echo "dataset:      $OUT/data  (train/ and val/ class folders)"
echo "betons:       $OUT/betons/{train,val}.beton, classes.json, convert_report.json, train_grid.png"
echo "training log: $OUT/logs/demo/training_log.md (+ .json, loss.png, accuracy.png, lr.png)"
echo "LR finder:    $OUT/lr_finder_plots/lr_finder_demo.png, $OUT/lr_suggestion_demo.json"
echo "TensorBoard:  tensorboard --logdir $OUT/runs"
echo "checkpoints:  $OUT/checkpoints/demo/"
echo "export:       $OUT/export/ (weights.pt, model.pt2, classes.json, MODEL_CARD.md)"
