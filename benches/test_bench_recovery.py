"""Memory and speed of one recovery fine-tuning step: HF dense, HF + torch.nn.utils.prune masks,
and ours (CSR at several sparsities, 2:4), each in a fresh process (benches/recovery_step.py).

    pytest benches/test_bench_recovery.py            # t5-small and t5-base shapes
    SPARSE_T5_RECOVERY_SHAPES=t5-small pytest ...    # a subset

Each test records the worker's figures (peak RSS, median step time, model-state bytes split into
sparse layers and the rest) in the benchmark's extra_info; benches/report.py turns them into the
README's Results table and plot.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = os.environ.get("SPARSE_T5_RECOVERY_SHAPES", "t5-small,t5-base").split(",")
VARIANTS = ["hf_dense", "hf_mask", "csr:0.2", "csr:0.5", "csr:0.8", "csr:0.9", "2:4"]
STEPS = int(os.environ.get("SPARSE_T5_RECOVERY_STEPS", "3"))


def run_worker(shape, variant):
    out = subprocess.run([sys.executable, os.path.join(HERE, "recovery_step.py"), "--shape", shape,
                          "--variant", variant, "--steps", str(STEPS)],
                         capture_output=True, text=True, timeout=3000, cwd=HERE)
    if out.returncode != 0:
        raise RuntimeError(f"recovery_step.py {shape} {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_recovery_step(benchmark, shape, variant):
    result = {}

    def measure():
        result.update(run_worker(shape, variant))

    benchmark.group = f"recovery step {shape}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["peak_rss_bytes"] > 0 and result["step_time_median_s"] > 0
