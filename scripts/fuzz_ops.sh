#!/usr/bin/env bash
# The long fuzz run of the six CPU ops (issue 31; README "Bad input"): tests/test_ops_fuzz.py with
# many examples per property and several seeds, first against the installed extension, then against
# the ASan + UBSan build of the same ops (CMake's build-asan/libsparse_t5_ops.so, loaded in place of
# sparse_t5._C through SPARSE_T5_OPS_LIBRARY, with libasan preloaded into the uninstrumented Python).
#
#   scripts/fuzz_ops.sh                      # 3 seeds, 4000 examples per property: >= 10,000 calls per op and run
#   SEEDS="7 8" EXAMPLES=500 scripts/fuzz_ops.sh
#   SANITIZED_ONLY=1 scripts/fuzz_ops.sh     # only the ASan + UBSan runs
#
# Prints, per op, the calls made (well-formed; malformed that raised; malformed that were accepted)
# over all runs, and the sanitizer reports found (pytest captures only sys.stdout/err here, so a
# report written to fd 2 reaches the log). Exits 1 on a failed property, an abort, any sanitizer
# report, or any accepted malformed call.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SEEDS=${SEEDS:-"1 2 3"}
EXAMPLES=${EXAMPLES:-4000}
OUT=${OUT:-runs/fuzz}
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log

TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build-asan -G Ninja -DSPARSE_T5_SANITIZE=ON -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" >/dev/null || exit 1
cmake --build build-asan -j"$(nproc)" --target sparse_t5_ops >/dev/null || exit 1
ASAN_LIB=$(${CXX:-c++} -print-file-name=libasan.so)
UBSAN_LIB=$(${CXX:-c++} -print-file-name=libubsan.so)

failed=0
run() {  # run NAME SEED [env...]
  local name=$1 seed=$2; shift 2
  local log="$OUT/$name-seed$seed.log"
  echo "== $name, seed $seed, $EXAMPLES examples per property"
  env "$@" SPARSE_T5_FUZZ_LONG=1 SPARSE_T5_FUZZ_EXAMPLES="$EXAMPLES" \
    SPARSE_T5_FUZZ_STATS="$OUT/$name-seed$seed.json" \
    "$PY" -m pytest tests/test_ops_fuzz.py -q --capture=sys -p no:cacheprovider -W ignore::DeprecationWarning \
    --hypothesis-seed="$seed" >"$log" 2>&1
  local rc=$?
  tail -n 1 "$log"
  if [ $rc -ne 0 ]; then echo "   exit $rc (see $log)"; failed=1; fi
}
for seed in $SEEDS; do
  [ "${SANITIZED_ONLY:-0}" = 1 ] || run plain "$seed"
  run asan "$seed" SPARSE_T5_OPS_LIBRARY="$PWD/build-asan/libsparse_t5_ops.so" \
    LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB" \
    ASAN_OPTIONS=detect_leaks=0:detect_container_overflow=0:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
done

"$PY" - "$OUT" <<'EOF'
import collections, glob, json, os, re, sys
out = sys.argv[1]
total = collections.defaultdict(collections.Counter)
fewest = {}  # the fewest calls of each op in one run
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    for op, c in json.load(open(path)).items():
        total[op].update(c)
        fewest[op] = min(fewest.get(op, 1 << 62), sum(c.values()))
reports = 0
for path in glob.glob(os.path.join(out, "asan-*.log")):
    text = open(path, errors="replace").read()
    reports += len(re.findall(r"ERROR: AddressSanitizer|runtime error:", text))
print(f"\n{'op':30} {'calls':>8} {'fewest in a run':>16} {'well-formed':>12} {'malformed raised':>17} "
      f"{'malformed accepted':>19}")
for op in sorted(total):
    c = total[op]
    calls = sum(c.values())
    print(f"{op:30} {calls:8d} {fewest[op]:16d} {c['well_formed']:12d} {c['malformed_raised']:17d} {c['malformed_accepted']:19d}")
print(f"runs: {len(glob.glob(os.path.join(out, '*.json')))}; sanitizer reports: {reports}")
sys.exit(1 if reports or any(c["malformed_accepted"] for c in total.values()) else 0)
EOF
[ $? -eq 0 ] || failed=1
exit $failed
