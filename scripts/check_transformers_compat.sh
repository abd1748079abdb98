#!/usr/bin/env bash
# Runs the tests that touch transformers against each end of the supported transformers range
# (sparse_t5/hf_compat.py TESTED_TRANSFORMERS), as `make compat` does: for each version, a virtual
# environment that sees this environment's packages (--system-site-packages) and installs only that
# transformers (with the tokenizers / huggingface-hub it requires) on top, so nothing else differs
# from what `make test` ran with. The checkout is used in place (its extension, built by
# scripts/setup.sh against this torch). Then HF's own T5 suite for that version (scripts/peer_suite.py),
# where an archive of its tree exists in ../shared/peer (or $SPARSE_T5_PEER_DIR); the summary says when none does.
#
#   scripts/check_transformers_compat.sh                 the range's ends: 4.49.0 and 5.25.0
#   scripts/check_transformers_compat.sh 5.4.0 ...       other versions
#   PEER=0 scripts/check_transformers_compat.sh ...      without the peer suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ROOT=$(pwd)
PEER_DIR=${SPARSE_T5_PEER_DIR:-$(dirname "$ROOT")/shared/peer}
if [ $# -gt 0 ]; then VERSIONS=("$@"); else
  mapfile -t VERSIONS < <("$PY" -c 'from sparse_t5.hf_compat import TESTED_TRANSFORMERS as t; print(*t, sep="\n")' 2>/dev/null)
fi
TESTS=(tests/test_modeling_t5.py tests/test_pruning.py tests/test_generation_cache.py tests/test_checkpoint.py
       tests/test_hf_trainer.py
       tests/test_dsi.py::test_constrained_beam_search_returns_valid_distinct_docids
       tests/test_dsi.py::test_trie_never_returns_an_empty_allowed_set
       tests/test_dsi.py::test_rescoring_ranks_the_preferred_docid_first
       tests/test_dsi.py::test_tiny_end_to_end_cycle)
WORK=$(mktemp -d -t sparse-t5-hfcompat-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
summary=()
status=0
for v in "${VERSIONS[@]}"; do
  echo "== transformers $v"
  env_dir="$WORK/venv-$v"
  "$PY" -m venv --system-site-packages "$env_dir"
  t0=$(date +%s)
  # datasets with it: transformers' Trainer imports datasets when installed (pyserini pulls it in), and
  # this environment's datasets 5.x needs huggingface-hub >= 1.31, which transformers 4.49 downgrades
  # below 1.0 (its Trainer then fails to import); pip picks a datasets that fits the hub it installs.
  "$env_dir/bin/python" -m pip install --quiet "transformers==$v" datasets 2>&1 | grep -vE "^WARNING: Location|dependency conflicts|requires|incompatible" || true
  t1=$(date +%s)
  log="$WORK/pytest-$v.log"
  if (PYTHONPATH="$ROOT" "$env_dir/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}") >"$log" 2>&1; then
    result=$(grep -E "passed|failed" "$log" | tail -1)
  else
    result="FAILED: $(grep -E "passed|failed|rror" "$log" | tail -1)"; status=1; tail -40 "$log"
  fi
  t2=$(date +%s)
  tv=$("$env_dir/bin/python" -c "import transformers, torch; print(transformers.__version__, '| torch', torch.__version__)")
  line="transformers $tv: install $((t1 - t0)) s, tests $((t2 - t1)) s: $result"
  archive="$PEER_DIR/transformers-$v-tests.tar.gz"
  if [ "${PEER:-1}" != 1 ]; then
    line="$line; HF's T5 suite (peer): not run (PEER=0)"
  elif [ -f "$archive" ]; then
    t3=$(date +%s)
    if SPARSE_T5_PEER_DIR="$PEER_DIR" "$PY" scripts/peer_suite.py --versions "$v" >"$WORK/peer-$v.log" 2>&1; then
      peer="passed"; else peer="FAILED"; status=1; fi
    grep -E "^\[|swap-only|UNEXPLAINED|NOT A HARNESS|stale|peer suite" "$WORK/peer-$v.log" || true
    line="$line; HF's T5 suite (peer): $peer in $(( $(date +%s) - t3 )) s"
  else  # said, not skipped in silence: ../shared/peer holds HF's trees for some releases only
    line="$line; HF's T5 suite (peer): NOT RUN, no $archive"
  fi
  summary+=("$line")
done
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $status
