#!/usr/bin/env bash
# Installs what is missing for sparse-t5 into the current Python environment, then builds the
# C++ extension in place (pip install -e). Safe to rerun: it installs nothing that is present.
#
#   scripts/setup.sh            the package and its runtime dependencies
#   scripts/setup.sh test       + test dependencies (pytest, pytest-benchmark, cmake, ninja)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

# torch: leave a user's torch alone. With none installed, take the CPU build when there is no
# NVIDIA GPU (a plain `pip install torch` pulls a CUDA build of several GB).
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install torch
  else
    "$PY" -m pip install "torch==2.13.0"
  fi
fi

# Build tools for the extension (built against the installed torch, hence no build isolation).
"$PY" -m pip install --quiet "setuptools>=64" wheel ninja

spec="."
if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; fi
"$PY" -m pip install --quiet --no-build-isolation -e "$spec"
"$PY" -c "import sparse_t5, torch; print('sparse_t5 ready: torch', torch.__version__, '| CPU kernels:', sparse_t5.cpu_isa())"
