#!/usr/bin/env bash
# The project's test command (README quick start, .ci/run): installs what is missing, then runs
#  1. the C++ unit tests with ctest, in a normal build and an ASan + UBSan build;
#  2. the Python test suite with pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scripts/setup.sh test

TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
JOBS=$(nproc 2>/dev/null || echo 2)
for cfg in "build-cpp:OFF" "build-asan:ON"; do
  dir=${cfg%%:*}; san=${cfg##*:}
  echo "== ctest ($dir, sanitizers $san)"
  cmake -S . -B "$dir" -G Ninja -DSPARSE_T5_SANITIZE="$san" -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >/dev/null
  cmake --build "$dir" -j"$JOBS" >/dev/null
  ctest --test-dir "$dir" --output-on-failure
done

echo "== pytest"
"$PY" -m pytest tests "$@"
