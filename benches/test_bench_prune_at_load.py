"""The memory headline: starting from a dense checkpoint on disk, as a pruning study does.

    pytest benches/test_bench_prune_at_load.py      (make report runs it and puts it in the README)

Each figure is the whole-process peak RSS of a fresh process (benches/recovery_step.py
--whole-process): load the checkpoint, prune it, then recovery steps (AdamW, batch 8, source 32,
target 8), against dense t5-base training measured the same way.
- t5-base: dense training; load dense then sparsify(0.9); prune-at-load at 0.9.
- t5-large (d_model 1024, d_ff 4096, 24 + 24 layers): prune-at-load at 0.9, then recovery.
- the load alone (--steps 0): prune-at-load of t5-large against its bound, the compressed model
  + 2 x the largest tensor + a small constant.
The dense checkpoints (t5-base 0.9 GB, t5-large 2.9 GB) are written once to
$SPARSE_T5_BENCH_CACHE (default: the temp dir).
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
STEPS = int(os.environ.get("SPARSE_T5_RECOVERY_STEPS", "3"))
RUNS = [
    ("t5-base", "hf_dense", STEPS),
    ("t5-base", "load_then_sparsify:csr:0.9", STEPS),
    ("t5-base", "prune_at_load:csr:0.9", STEPS),
    ("t5-large", "prune_at_load:csr:0.9", STEPS),
    ("t5-large", "prune_at_load:csr:0.9", 0),
]


def run_worker(shape, variant, steps):
    out = subprocess.run([sys.executable, os.path.join(HERE, "recovery_step.py"), "--shape", shape, "--variant",
                          variant, "--steps", str(steps), "--whole-process"],
                         capture_output=True, text=True, timeout=3000, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"recovery_step.py {shape} {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


@pytest.mark.parametrize("shape,variant,steps", RUNS, ids=[f"{s}-{v}-{n}steps" for s, v, n in RUNS])
def test_whole_process_peak(benchmark, shape, variant, steps):
    result = {}

    def measure():
        result.update(run_worker(shape, variant, steps))

    benchmark.group = "prune-at-load, whole process"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    result["steps"] = steps
    benchmark.extra_info.update(result)
    assert result["load_peak_rss_bytes"] > 0
