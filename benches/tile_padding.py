"""The token-tile widths of the tiled CPU kernels (CSR and 2:4: forward, dx, dW) against their rules,
on T5 layer shapes at token counts where a wide tile pads and where it does not.

    python benches/tile_padding.py [--ops csr_dx semi24_dw ...] [--tokens 96 128 160 ...] [--rounds 21]

Every nonzero computes a whole token tile, padding included (csrc/op_common.h,
narrower_where_wide_pads): 96 fp32 tokens fill two 64-token tiles (128 slots) or three 32-token
ones (96). The rules take the narrower tile where the wide one pads at least 10% more slots on the
busiest thread. Here each width is forced in turn (`torch.ops.sparse_t5.set_tile_vectors`) and
timed against the rule's own choice, call by call on the same inputs (time_interleaved, the loop
`sparse-t5 tune` times with); the table gives each width's median time against the rule's, and
the rule's against the best width's (1.00: the rule chose the fastest). Only the sparse method
runs (kernel policy "sparse"); the dx is the path the binding takes at that token count (the
scatter below csr_dx_transpose_tokens, 256 by default; the forward over a transient Wᵀ from it).
"""
from __future__ import annotations

import argparse

import torch

from bench_utils import machine_info, time_interleaved
from sparse_t5.formats import CSRWeight, Semi24Weight
from sparse_t5.kernel_policy import kernel_policy

# (in, out): t5-base FFN wi and wo, t5-base attention
SHAPES = [(768, 3072), (3072, 768), (768, 768)]
OPS = ["csr_forward", "csr_dx", "csr_dw", "semi24_forward", "semi24_dx", "semi24_dw"]


def op_call(op, w, x, dy):
    ops = torch.ops.sparse_t5
    out_f, in_f = w.shape
    if op.startswith("csr"):
        v, p, c = w.values, w.row_ptr, w.col_idx
        return {"csr_forward": lambda: ops.csr_linear(x, v, p, c, out_f, in_f, None),
                "csr_dx": lambda: ops.csr_linear_backward_input(dy, v, p, c, out_f, in_f),
                "csr_dw": lambda: ops.csr_sddmm(dy, x, p, c, out_f, in_f)}[op]
    return {"semi24_forward": lambda: ops.semi24_linear(x, w.values, w.meta, None),
            "semi24_dx": lambda: ops.semi24_linear_backward_input(dy, w.values, w.meta),
            "semi24_dw": lambda: ops.semi24_sddmm(dy, x, w.meta)}[op]


def forced(fn, vectors):
    def call():
        torch.ops.sparse_t5.set_tile_vectors(vectors)
        return fn()
    return call


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", choices=OPS, default=OPS)
    p.add_argument("--tokens", type=int, nargs="+", default=[96, 128, 160, 224, 256, 288, 320])
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5], help="CSR ops (2:4 is 0.5)")
    p.add_argument("--rounds", type=int, default=21, help="timed calls per provider")
    a = p.parse_args(argv)
    m = machine_info()
    print(f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, kernels {m['kernel_isa']}, fp32; "
          f"median of {a.rounds} alternating calls each; time against the rule's tile\n")
    print("| op | shape | density | tokens | 2 vectors | 4 vectors | 8 vectors | rule / best |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    try:
        for op in a.ops:
            widths = [2, 4, 8] if op == "semi24_dw" else [2, 4]
            for in_f, out_f in SHAPES:
                for density in (a.densities if op.startswith("csr") else [0.5]):
                    dense = torch.randn(out_f, in_f, generator=g)
                    if op.startswith("csr"):
                        w = CSRWeight.from_dense(dense * (torch.rand(out_f, in_f, generator=g) < density))
                    else:
                        w = Semi24Weight.from_dense(dense)
                    for tokens in a.tokens:
                        x = torch.randn(tokens, in_f, generator=g)
                        dy = torch.randn(tokens, out_f, generator=g)
                        fn = op_call(op, w, x, dy)
                        providers = {"rule": forced(fn, 0), **{v: forced(fn, v) for v in widths}}
                        with torch.inference_mode(), kernel_policy("sparse"):
                            ref = providers["rule"]()
                            for v in widths:  # every width computes the same thing
                                torch.testing.assert_close(providers[v](), ref, rtol=1e-4, atol=1e-3)
                            med = time_interleaved(providers, a.rounds)
                        cells = [f"{med[v] / med['rule']:.2f}" if v in med else "" for v in (2, 4, 8)]
                        best = min(med[v] for v in widths)
                        print(f"| {op} | {in_f}->{out_f} | {density:g} | {tokens} | " + " | ".join(cells) +
                              f" | {med['rule'] / best:.2f} |", flush=True)
    finally:
        torch.ops.sparse_t5.set_tile_vectors(0)


if __name__ == "__main__":
    main()
