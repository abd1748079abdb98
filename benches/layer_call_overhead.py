"""What one call of a sparse layer costs besides its product: the Python and dispatch overhead that
a decode step pays ~100 times (a t5-base decoder step calls 96 sparse layers at 1 token).

    python benches/layer_call_overhead.py [--rounds 7] [--calls 5000]

On a 16 x 16 layer at 1 token (the product itself is negligible), in inference mode, at 1 thread and
at torch's thread count, it times alternately in one process (loops of --calls calls, median over
--rounds) and prints microseconds per call:
  - `F.linear`, `nn.Linear`: the dense op and its module, the floor a PyTorch layer pays;
  - `csr op`, `2:4 op`: torch.ops.sparse_t5.csr_linear / semi24_linear called directly;
  - `CSRLinear`, `Semi24Linear`: our modules, as the model calls them.
`module - op` is what our module's forward adds over its op, to set beside nn.Linear - F.linear.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info  # noqa: E402

from sparse_t5.layers import SparseLinear  # noqa: E402


def per_call_us(fns: dict, rounds: int, calls: int) -> dict:
    for fn in fns.values():
        for _ in range(calls // 10):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 16)
    csr = SparseLinear.from_dense(lin, torch.rand(16, 16) < 0.5)
    semi = SparseLinear.from_dense(lin, format="2:4")
    x = torch.randn(1, 16)
    ops = torch.ops.sparse_t5
    # The ops' arguments bound once: Module.__getattr__ would add ~0.5 us a name to the op's figure.
    cv, cr, cc, cb = csr.values, csr.row_ptr, csr.col_idx, csr.bias
    sv, sm, sb = semi.values, semi.meta, semi.bias
    fns = {
        "F.linear": lambda: torch.nn.functional.linear(x, lin.weight, lin.bias),
        "nn.Linear": lambda: lin(x),
        "csr op": lambda: ops.csr_linear(x, cv, cr, cc, 16, 16, cb),
        "CSRLinear": lambda: csr(x),
        "2:4 op": lambda: ops.semi24_linear(x, sv, sm, sb),
        "Semi24Linear": lambda: semi(x),
    }
    threads = torch.get_num_threads()
    print(f"{machine_info()}; 16 x 16 layer, 1 token, inference mode; us per call, median of {args.rounds} "
          f"rounds of {args.calls} calls")
    print("\n| threads | " + " | ".join(fns) + " | CSRLinear - op | Semi24Linear - op | nn.Linear - F.linear |")
    print("|---" * (len(fns) + 4) + "|")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        with torch.inference_mode():
            t = per_call_us(fns, args.rounds, args.calls)
        cells = [f"{t[k]:.2f}" for k in fns]
        cells += [f"{t['CSRLinear'] - t['csr op']:.2f}", f"{t['Semi24Linear'] - t['2:4 op']:.2f}",
                  f"{t['nn.Linear'] - t['F.linear']:.2f}"]
        print(f"| {n} | " + " | ".join(cells) + " |")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
