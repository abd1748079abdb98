"""The CPU ops under contention: one other busy process pinned to one of the cores, as a data-loading
worker or a tokenizer would be (issue 15).

    python benches/contention.py [--tokens 256] [--density 0.1] [--rounds 30]

Times, alternately in one run (bench_utils.time_interleaved), the CSR forward, dX and dvalues of
a T5-base FFN weight (3072 x 768) by our sparse kernels, dense `F.linear` / matmul on the
uncompressed weight (MKL), and for the forward `torch.sparse.mm` (MKL CSR); first on an idle
machine, then with the busy process. Prints and writes benches/results/contention.json: each
method's median time and ours-vs-MKL ratios, idle and contended, and their quotient (the target is
contended ratio >= 0.8x the idle ratio).

    SPARSE_T5_STATIC_SCHEDULE=1 python benches/contention.py --out /tmp/static.json

measures the kernels with the schedule they had before (one static block per thread,
csrc/cpu/parallel.h), for the before/after comparison.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info, time_interleaved  # noqa: E402

from sparse_t5 import SparseLinear, kernel_policy  # noqa: E402

ops = torch.ops.sparse_t5


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


def measure(layer, w, x, dy, rounds: int) -> dict:
    a = (layer.row_ptr, layer.col_idx, layer.out_features, layer.in_features)
    ws = w.to_sparse_csr()

    def sparse(fn):
        def run():
            with kernel_policy("sparse"):
                fn()
        return run

    with torch.no_grad():
        return {k: v * 1e3 for k, v in time_interleaved({
            "ours forward": sparse(lambda: ops.csr_linear(x, layer.values, *a)),
            "MKL dense forward": lambda: F.linear(x, w),
            "MKL CSR forward": lambda: torch.sparse.mm(ws, x.t()),
            "ours dX": sparse(lambda: ops.csr_linear_backward_input(dy, layer.values, *a)),
            "MKL dense dX": lambda: dy @ w,
            "ours dvalues": sparse(lambda: ops.csr_sddmm(dy, x, *a)),
            "MKL dense dW": lambda: dy.t() @ x,
        }, rounds, warmup=3).items()}


def ratios(ms: dict) -> dict:
    """How many times faster ours is than each MKL reference (> 1: ours is faster)."""
    return {"forward vs dense": ms["MKL dense forward"] / ms["ours forward"],
            "forward vs MKL CSR": ms["MKL CSR forward"] / ms["ours forward"],
            "dX vs dense": ms["MKL dense dX"] / ms["ours dX"],
            "dvalues vs dense dW": ms["MKL dense dW"] / ms["ours dvalues"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--core", type=int, default=1, help="the core the busy process is pinned to")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "contention.json"))
    a = p.parse_args(argv)
    torch.manual_seed(0)
    w = torch.randn(3072, 768) * (torch.rand(3072, 768) < a.density)
    layer = SparseLinear.from_dense(w, w != 0)
    x, dy = torch.randn(a.tokens, 768), torch.randn(a.tokens, 3072)
    idle = measure(layer, w, x, dy, a.rounds)
    busy = multiprocessing.get_context("spawn").Process(target=_spin, args=(a.core,), daemon=True)
    busy.start()
    try:
        time.sleep(0.5)
        contended = measure(layer, w, x, dy, a.rounds)
    finally:
        busy.terminate()
        busy.join()
    r_idle, r_busy = ratios(idle), ratios(contended)
    schedule = "static" if os.environ.get("SPARSE_T5_STATIC_SCHEDULE") else "dynamic"
    result = {"machine": machine_info(), "schedule": schedule, "tokens": a.tokens, "density": a.density, "shape": [3072, 768],
              "ms_idle": idle, "ms_contended": contended, "ratio_idle": r_idle, "ratio_contended": r_busy,
              "contended_over_idle": {k: r_busy[k] / r_idle[k] for k in r_idle}}
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"schedule: {schedule}")
    for k in r_idle:
        print(f"{k:22s} idle {r_idle[k]:5.2f}x  contended {r_busy[k]:5.2f}x  "
              f"contended/idle {r_busy[k] / r_idle[k]:.2f}")


if __name__ == "__main__":
    main()
