"""What the structure checks of the CPU ops cost per call (issue 31), at t5-base shapes.

    python benches/structure_checks.py [--rounds 200] [--out benches/results/structure_checks.json]

For each op (CSR forward, dX, dvalues at density 0.5 and 0.1; the 2:4 forward, dX, dvalues) on
the t5-base FFN weights (768 -> 3072 and 3072 -> 768), at 1 and 512 tokens, it times alternately in
one process (bench_utils.time_interleaved):
  - `once`:       the default; the O(nnz) checks ran on the first call and are remembered
                  (csrc/structure_checks.h);
  - `every_call`: the O(nnz) checks on every call (torch.ops.sparse_t5.set_structure_checks);
  - `0 tokens`:   the same op with no tokens under `once`: everything a call costs besides the
                  product (dispatch, argument checks, the remembered-structure lookup, the output
                  allocation), an upper bound on what the checks cost on the default path.
and prints the cost of a full check (every_call - once) and the 0-token call as fractions of the op.
The target: the default path's checks under 2% of the op.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info, time_interleaved  # noqa: E402

from sparse_t5.formats import CSRWeight, Semi24Weight  # noqa: E402

ops = torch.ops.sparse_t5
SHAPES = {"wi 768->3072": (3072, 768), "wo 3072->768": (768, 3072)}  # t5-base FFN


def op_calls(fmt: str, out_f: int, in_f: int, tokens: int):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g)
    dy = torch.randn(tokens, out_f, generator=g)
    if fmt == "2:4":
        s = Semi24Weight.from_dense(w)
        return {"forward": lambda x=x: ops.semi24_linear(x, s.values, s.meta, None),
                "dX": lambda dy=dy: ops.semi24_linear_backward_input(dy, s.values, s.meta),
                "dvalues": lambda dy=dy, x=x: ops.semi24_sddmm(dy, x, s.meta)}
    density = float(fmt.split()[-1])
    mask = torch.rand(out_f, in_f, generator=g) < density
    c = CSRWeight.from_dense(w, mask)
    a = (c.row_ptr, c.col_idx, out_f, in_f)
    return {"forward": lambda x=x: ops.csr_linear(x, c.values, *a, None),
            "dX": lambda dy=dy: ops.csr_linear_backward_input(dy, c.values, *a),
            "dvalues": lambda dy=dy, x=x: ops.csr_sddmm(dy, x, *a)}


def every_call(fn):
    def run():
        ops.set_structure_checks("every_call")
        try:
            fn()
        finally:
            ops.set_structure_checks("once")
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    rows = []
    print(f"{'format':10} {'shape':14} {'op':8} {'tokens':>6} {'op us':>9} {'full check':>11} "
          f"{'0-token call':>13}")
    with torch.no_grad():
        for fmt in ("CSR 0.5", "CSR 0.1", "2:4"):
            for shape_name, (out_f, in_f) in SHAPES.items():
                for tokens in (1, 512):
                    calls = op_calls(fmt, out_f, in_f, tokens)
                    x0 = torch.empty(0, in_f)
                    dy0 = torch.empty(0, out_f)
                    for op, fn in calls.items():
                        # The same op on the same weight with no tokens (fn's inputs are defaults).
                        zero = (lambda fn=fn: fn(x0)) if op == "forward" else \
                            (lambda fn=fn: fn(dy0)) if op == "dX" else (lambda fn=fn: fn(dy0, x0))
                        t = time_interleaved({"once": fn, "every_call": every_call(fn), "zero": zero},
                                             rounds=args.rounds if tokens == 1 else max(20, args.rounds // 10))
                        row = {"format": fmt, "shape": shape_name, "op": op, "tokens": tokens,
                               "op_us": t["once"] * 1e6, "every_call_us": t["every_call"] * 1e6,
                               "zero_token_us": t["zero"] * 1e6}
                        row["full_check_fraction"] = (t["every_call"] - t["once"]) / t["once"]
                        row["zero_token_fraction"] = t["zero"] / t["once"]
                        rows.append(row)
                        print(f"{fmt:10} {shape_name:14} {op:8} {tokens:6d} {row['op_us']:9.1f} "
                              f"{100 * row['full_check_fraction']:10.1f}% {100 * row['zero_token_fraction']:12.2f}%")
    result = {"machine": machine_info(), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
