#!/usr/bin/env bash
# Build .venv-runtime: the On Cloud N code-execution runtime's Python 3.9 and pinned packages, so a submission's
# main.py can be run here under the versions it will meet there (see ../shared/docs/COMPETITION.md).
#
# Usage (from anywhere; the venv lands at the repository root):  bash scripts/make_runtime_env.sh
#   RUNTIME_PYTHON=/path/to/python3.9   use this interpreter instead of searching pyenv / PATH
#   RUNTIME_VENV=DIR                    build somewhere else than <repo>/.venv-runtime
#
# Idempotent: a venv whose stamp matches the interpreter version and the pins below is left alone; anything else
# (missing stamp after an interrupted build, changed pins) is deleted and rebuilt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RUNTIME_VENV:-$ROOT/.venv-runtime}"
STAMP="$VENV/.cloudseg-runtime-stamp"

# The runtime has torch 1.8.0, but PyPI has no torchvision wheel matching 1.8.0 for cp39; 1.8.1 is the closest
# release with a torchvision 0.9.1 wheel and the same serialisation and operator set.
PINS=(
  "torch==1.8.1"
  "torchvision==0.9.1"
  "segmentation-models-pytorch==0.2.1"
  "timm==0.4.12"
  "numpy==1.20.3"
  "rasterio==1.2.6"
  "tifffile==2021.8.8"
  "pillow==8.2.0"
  "pandas==1.2.5"
  # STAC access for models with supplementary bands (main.py + stac_bands.py); planetary-computer 0.4.2 was
  # written against pydantic 1 (BaseSettings), which the runtime had
  "pystac-client==0.3.1"
  "planetary-computer==0.4.2"
  "pydantic==1.8.2"
)

log() { echo "[runtime-env] $*"; }

find_python39() {
  if [ -n "${RUNTIME_PYTHON:-}" ]; then
    echo "$RUNTIME_PYTHON"; return 0
  fi
  local root cand
  if command -v pyenv >/dev/null 2>&1 && root="$(pyenv root 2>/dev/null)"; then
    # Newest 3.9.x that pyenv has installed (the runtime runs 3.9.7; any 3.9 parses and behaves the same here).
    for cand in $(ls -d "$root"/versions/3.9*/bin/python3.9 2>/dev/null | sort -V -r); do
      [ -x "$cand" ] && { echo "$cand"; return 0; }
    done
  fi
  if cand="$(command -v python3.9 2>/dev/null)" && "$cand" -c 'import sys' >/dev/null 2>&1; then
    echo "$cand"; return 0
  fi
  return 1
}

if ! PY39="$(find_python39)"; then
  cat >&2 <<'EOF'
[runtime-env] error: no Python 3.9 interpreter found.
  Looked for $(pyenv root)/versions/3.9*/bin/python3.9 and python3.9 on PATH.
  Install one, e.g. `pyenv install 3.9.18` (pyenv: https://github.com/pyenv/pyenv), or
  `apt-get install python3.9 python3.9-venv`, or point RUNTIME_PYTHON=/path/to/python3.9 at an existing one.
EOF
  exit 1
fi
if ! "$PY39" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 9) else 1)'; then
  echo "[runtime-env] error: $PY39 is not Python 3.9 ($("$PY39" -V 2>&1)); set RUNTIME_PYTHON to a 3.9 interpreter" >&2
  exit 1
fi

WANT="$("$PY39" -c 'import platform; print(platform.python_version())') ${PINS[*]}"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  log "$VENV is up to date ($WANT)"
  exit 0
fi

if [ -e "$VENV" ]; then
  log "removing stale or incomplete $VENV"
  rm -rf "$VENV"
fi

start=$(date +%s)
log "building $VENV with $PY39"
"$PY39" -m venv "$VENV"
# The sdists of smp 0.2.1's dependencies (pretrainedmodels, efficientnet-pytorch) need setuptools + wheel to build.
pip_quiet() {
  # Some machines list local index folders that lack most projects; pip warns once per package about each. Drop
  # those lines only (pipefail keeps pip's own exit status).
  "$VENV/bin/python" -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_quiet --upgrade "pip<25" "setuptools<70" wheel
pip_quiet "${PINS[@]}"

log "checking imports"
"$VENV/bin/python" - <<'EOF'
import PIL, numpy, pandas, rasterio, segmentation_models_pytorch as smp, tifffile, timm, torch, torchvision
import planetary_computer, pystac_client
print(f"[runtime-env] python ok: torch {torch.__version__}, torchvision {torchvision.__version__}, smp {smp.__version__}, "
      f"timm {timm.__version__}, numpy {numpy.__version__}, rasterio {rasterio.__version__}, pillow {PIL.__version__}")
EOF

echo "$WANT" > "$STAMP"
log "done in $(( $(date +%s) - start )) s; $(du -sh "$VENV" | cut -f1) in $VENV"
