"""A whole recovery step on a CUDA GPU (issue 15): t5-base, batch 32, source 256, target 32, fp32
and bf16 autocast; ours at CSR 0.2 / 0.5 / 0.9 and 2:4 (kernel policy auto) against HF dense and HF
with torch.nn.utils.prune masks. Step time and torch.cuda.max_memory_allocated, each variant in a
fresh process (benches/recovery_step.py). Skipped without CUDA.

    pytest benches/test_bench_gpu_recovery.py --benchmark-json=gpu.json
"""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["hf_dense", "hf_mask", "csr:0.2", "csr:0.5", "csr:0.9", "2:4"]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_recovery_step(benchmark, variant, precision):
    cmd = [sys.executable, os.path.join(HERE, "recovery_step.py"), "--shape", "t5-base", "--variant", variant,
           "--steps", "5", "--device", "cuda", "--batch", "32", "--source", "256", "--target", "32"]
    result = {}

    def measure():
        out = subprocess.run(cmd + (["--bf16"] if precision == "bf16" else []), capture_output=True, text=True,
                             timeout=1800, cwd=HERE)
        assert out.returncode == 0, out.stderr[-4000:]
        result.update(json.loads(out.stdout))

    benchmark.group = f"GPU recovery step t5-base {precision}"
    benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["step_time_median_s"] > 0 and result["cuda_max_memory_allocated_bytes"] > 0
