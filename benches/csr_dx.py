"""The CSR dx = dy W on CPU: the scatter against the forward over a transient transpose, beside
dense `dy @ W`, on T5 layer shapes.

    python benches/csr_dx.py [--tokens 128 256 512 1024] [--densities 0.5 0.1] [--rounds 5]

Both are the sparse method of `csr_linear_backward_input` (csrc/cpu/csr_kernels_impl.h): the
scatter stores every dx vector it updates (one store per FMA); the transpose builds Wᵀ per call
(O(nnz), transient) and runs the forward kernel over it, which sums each dx vector in registers.
The providers run alternately, call by call, on the same inputs (time_interleaved, the loop
`sparse-t5 tune` times with); the table gives each median against dense's, and the transpose's
time against the scatter's.
The crossover it shows is what csrc/kernel_policy.cpp's kDefaultCsrDxTransposeTokens is set from;
`torch.ops.sparse_t5.set_csr_dx_transpose_tokens(n)` changes it in a process.
"""
from __future__ import annotations

import argparse

import torch

from bench_utils import machine_info, time_interleaved
from sparse_t5 import SparseLinear
from sparse_t5.kernel_policy import kernel_policy

# (in, out): t5-small and t5-base FFN wi and wo, t5-base attention, t5-large FFN wi and wo
SHAPES = [(512, 2048), (2048, 512), (768, 3072), (3072, 768), (768, 768), (1024, 4096), (4096, 1024)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--rounds", type=int, default=25, help="timed calls per provider")
    a = p.parse_args(argv)
    ops = torch.ops.sparse_t5
    before = ops.get_csr_dx_transpose_tokens()
    m = machine_info()
    print(f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}, kernels {m['kernel_isa']}; "
          f"median of {a.rounds} alternating calls each; time against dense dy @ W\n")
    print("| shape | density | tokens | scatter | transpose | transpose / scatter | dense |")
    print("|---|---|---|---|---|---|---|")
    try:
        for in_f, out_f in SHAPES:
            for density in a.densities:
                g = torch.Generator().manual_seed(0)
                mask = torch.rand(out_f, in_f, generator=g) < density
                w = torch.randn(out_f, in_f, generator=g) * mask
                layer = SparseLinear.from_dense(w, mask)
                for tokens in a.tokens:
                    dy = torch.randn(tokens, out_f, generator=g)

                    def ours(from_tokens):
                        ops.set_csr_dx_transpose_tokens(from_tokens)
                        return ops.csr_linear_backward_input(dy, layer.values, layer.row_ptr, layer.col_idx,
                                                             out_f, in_f)

                    providers = {"scatter": lambda: ours(0), "transpose": lambda: ours(1), "dense": lambda: dy @ w}
                    with torch.inference_mode(), kernel_policy("sparse"):
                        torch.testing.assert_close(providers["transpose"](), providers["dense"](), rtol=1e-4, atol=1e-3)
                        torch.testing.assert_close(providers["scatter"](), providers["dense"](), rtol=1e-4, atol=1e-3)
                        med = time_interleaved(providers, a.rounds)
                    print(f"| {in_f}->{out_f} | {density:g} | {tokens} | {med['scatter'] / med['dense']:.2f}x | "
                          f"{med['transpose'] / med['dense']:.2f}x | {med['transpose'] / med['scatter']:.2f} | "
                          f"{med['dense'] * 1e3:.2f} ms |", flush=True)
    finally:
        ops.set_csr_dx_transpose_tokens(before)


if __name__ == "__main__":
    main()
