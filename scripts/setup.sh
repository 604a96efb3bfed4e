#!/usr/bin/env bash
# One-time, idempotent set-up: system packages FFCV builds against, a virtual environment in .venv, and the
# project with its ffcv, dali and dev extras. Called by `make setup` (and so by `make demo` / `make test`).
#   PYTHON=python3.11 bash scripts/setup.sh     # choose the interpreter (>= 3.10)
#   RN50_SKIP_APT=1 bash scripts/setup.sh        # you installed the system packages yourself
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
APT_PACKAGES=(libturbojpeg0-dev libopencv-dev pkg-config)

say() { printf '[setup] %s\n' "$*"; }

# --- 1. system packages: FFCV 1.0.2 compiles against libjpeg-turbo and OpenCV (found through pkg-config), with g++
#        and the Python headers; a Debian/Ubuntu system Python also needs its venv package.
have_pkgconfig_libs() {
  command -v pkg-config >/dev/null 2>&1 &&
    pkg-config --exists libturbojpeg 2>/dev/null &&
    { pkg-config --exists opencv4 2>/dev/null || pkg-config --exists opencv 2>/dev/null; }
}
missing=()
have_pkgconfig_libs || missing+=("${APT_PACKAGES[@]}")
command -v g++ >/dev/null 2>&1 || missing+=(g++)
if command -v "$PYTHON" >/dev/null 2>&1; then
  pyver=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null || true)
  "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    2>/dev/null || missing+=("python${pyver}-dev")
  "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=("python${pyver}-venv")
fi
if [ -z "${RN50_SKIP_APT:-}" ] && [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"
  else
    echo "[setup] error: the system packages ${missing[*]} are needed, and this user can neither run apt-get" >&2
    echo "[setup]        as root nor use sudo. Ask an administrator to run:" >&2
    echo "[setup]          apt-get install -y ${missing[*]}" >&2
    echo "[setup]        then run 'make setup' again (or RN50_SKIP_APT=1 if they are installed elsewhere)." >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] error: no apt-get here; install the equivalents of ${missing[*]} (libjpeg-turbo and OpenCV" >&2
    echo "[setup]        development files, pkg-config, a C++ compiler, Python headers), then run 'make setup'" >&2
    echo "[setup]        again with RN50_SKIP_APT=1." >&2
    exit 1
  fi
  say "installing ${missing[*]} with apt-get"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  have_pkgconfig_libs || { echo "[setup] error: pkg-config still cannot find libturbojpeg and opencv4" >&2; exit 1; }
fi

# --- 2. virtual environment
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "[setup] error: $PYTHON is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

# --- 3. the project (torch and torchvision come as ranges from pyproject.toml)
say "installing rn50[ffcv,dali,dev] into $VENV (the first time takes a few minutes: torch, DALI, an FFCV build)"
"$VENV/bin/python" -m pip install -q -e ".[ffcv,dali,dev]"
"$VENV/bin/python" - <<'PY'
import importlib
for name in ("torch", "torchvision", "ffcv", "nvidia.dali", "numba", "cv2"):
    mod = importlib.import_module(name)
    print(f"[setup] {name:12s} {getattr(mod, '__version__', 'ok')}")
PY
say "done: activate with 'source $VENV/bin/activate', or call $VENV/bin/rn50"
