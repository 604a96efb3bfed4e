# Shared by the launch scripts (sourced from the repository root, not run): the preset for an epoch count, the
# venv's commands, the flags every launch passes, and DRY_RUN=1.

# rn50_preset SCRIPT EPOCHS: sets CONFIG to ffcv-imagenet's schedule for EPOCHS, or stops naming the ones there are.
rn50_preset() {
  CONFIG=configs/rn50_8xa100_${2}ep.yaml
  [ -f "$CONFIG" ] || { echo "$1: no $CONFIG (epochs: 16, 24, 32, 40, 56 or 88)" >&2; exit 2; }
}

# rn50_bin TOOL: sets BIN to the folder holding TOOL, the project's venv first (RN50_VENV), else PATH.
rn50_bin() {
  BIN=${RN50_VENV:-.venv}/bin
  [ -x "$BIN/$1" ] || BIN=$(dirname "$(command -v "$1" || echo "/missing/$1")")
  [ -x "$BIN/$1" ] || [ -n "${DRY_RUN:-}" ] || { echo "no $1: run make setup (or activate the venv)" >&2; exit 2; }
}

# rn50_train_args CONFIG DATA RUN OUT: sets ARGS, the trainer flags of a launch. --resume auto continues
# checkpoints/<run>/checkpoint.pt when it exists, else starts; it also covers a restart by torchrun itself, which
# re-runs the same command line.
rn50_train_args() {
  ARGS=(--config "$1" --data-dir "$2" --run-name "$3" --output-dir "$4" --resume auto)
}

# rn50_launch CMD...: run CMD in place of this script, or print it (DRY_RUN=1).
rn50_launch() {
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "$@"; echo; exit 0; fi
  exec "$@"
}
