#!/usr/bin/env bash
# Builds and tests sparse-t5 against each end of the supported torch range, as a new user would:
# in a fresh virtual environment per torch version, install that torch, then a plain
# `pip install -e .` (timed), then import sparse_t5 and run the op, format and layer tests (the CSR and
# 2:4 ops, their fuzzing, formats.py, layers.py), then the model and
# cached-generation tests under the transformers that install resolved and under the oldest supported.
#
#   scripts/check_torch_compat.sh                  the range's ends: 2.13.0 and 2.15.0
#   scripts/check_torch_compat.sh 2.14.1 ...       other versions
#
# Each run works on a copy of the tree (tracked and untracked, not ignored, files), so the
# extension built here for another torch never lands in your checkout. Needs the package index
# (torch 2.15.0 is a CUDA build of about 5 GB; pip's cache makes later runs fast).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(2.13.0 2.15.0)
WORK=$(mktemp -d -t sparse-t5-compat-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
summary=()
status=0
for v in "${VERSIONS[@]}"; do
  echo "== torch $v"
  env_dir="$WORK/venv-$v"; src="$WORK/src-$v"
  mkdir -p "$src"
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$src"
  "$PY" -m venv "$env_dir"
  t0=$(date +%s)
  "$env_dir/bin/python" -m pip install --quiet "torch==$v" pytest "$(grep '^hypothesis==' constraints.txt)" 2>&1 | grep -v "^WARNING: Location" || true
  t1=$(date +%s)
  if ! (cd "$src" && "$env_dir/bin/python" -m pip install --quiet -e . 2>&1 | grep -v "^WARNING: Location"; exit "${PIPESTATUS[0]}"); then
    summary+=("torch $v: pip install -e . FAILED"); status=1; continue
  fi
  t2=$(date +%s)
  log="$WORK/pytest-$v.log"
  if (cd "$src" && "$env_dir/bin/python" -c "import sparse_t5, torch; print('import ok: torch', torch.__version__, sparse_t5.cpu_isa())" \
      && "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_csr_linear.py tests/test_semi24_linear.py \
           tests/test_formats.py tests/test_layers.py tests/test_ops_fuzz.py) >"$log" 2>&1; then
    result=$(grep -E "passed|failed" "$log" | tail -1)
  else
    result="FAILED: $(grep -E "passed|failed|rror" "$log" | tail -1)"; status=1; tail -30 "$log"
  fi
  tv=$("$env_dir/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "$v")
  summary+=("torch $tv: torch install $((t1 - t0)) s, plain pip install -e . $((t2 - t1)) s, op tests: $result")
  # The model tests at both ends of the transformers range (sparse_t5/hf_compat.py): first the release
  # the plain install resolved (the newest), then the oldest supported, installed over it.
  for tf in resolved $(cd "$src" && "$env_dir/bin/python" -c "from sparse_t5.hf_compat import TESTED_TRANSFORMERS as t; print(t[0])"); do
    [ "$tf" = resolved ] || "$env_dir/bin/python" -m pip install --quiet "transformers==$tf" 2>&1 | grep -vE "^WARNING: Location" || true
    t3=$(date +%s)
    mlog="$WORK/model-$v-$tf.log"
    if (cd "$src" && "$env_dir/bin/python" -m pytest -q -p no:cacheprovider tests/test_modeling_t5.py tests/test_generation_cache.py) >"$mlog" 2>&1; then
      mresult=$(grep -E "passed|failed" "$mlog" | tail -1)
    else
      mresult="FAILED: $(grep -E "passed|failed|rror" "$mlog" | tail -1)"; status=1; tail -30 "$mlog"
    fi
    tfv=$("$env_dir/bin/python" -c "import transformers; print(transformers.__version__)")
    summary+=("torch $tv x transformers $tfv: model and cached-generation tests $(( $(date +%s) - t3 )) s: $mresult")
  done
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
