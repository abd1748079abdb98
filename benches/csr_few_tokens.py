"""The CSR forward at few tokens (decoding): the few-token path against the tiled kernel, dense F.linear
and MKL's CSR (torch.sparse.mm), on the t5-base FFN shapes, in inference mode.

    python benches/csr_few_tokens.py [--tokens 1 2 4 8] [--rounds 7]

Each round times every provider once, in the same order, on the same inputs (ours with
set_csr_few_tokens(8) for the few-token path and 0 for the tiled kernel); the table gives each
provider's median over the rounds as a ratio of dense's median. The bytes limit is what reading the
weight costs against dense (4 B per weight): 6 B per kept weight with an int16 index, so
1.5 x density. The crossover it shows is what csrc/kernel_policy.cpp's kDefaultCsrFewTokens is set
from; `torch.ops.sparse_t5.set_csr_few_tokens(n)` changes it in a process.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from sparse_t5 import SparseLinear
from sparse_t5.kernel_policy import cpu_model, kernel_policy

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
SHAPES = [(768, 3072), (3072, 768)]  # t5-base FFN wi and wo: (in, out)


def timed(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.1])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=20, help="calls per timing")
    a = p.parse_args(argv)
    ops = torch.ops.sparse_t5
    before, before_kernel = ops.get_csr_few_tokens(), ops.get_csr_few_tokens_kernel()
    gather = ops.cpu_isa() == "avx512"  # the gather kernel is AVX-512's
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, kernels {ops.cpu_isa()}; "
          f"median of {a.rounds} rounds; time against dense F.linear\n")
    print("| shape | density | tokens | few-token path (scalar) | few-token path (gather) | tiled kernel | MKL CSR | "
          "bytes limit | dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for in_f, out_f in SHAPES:
            for density in a.densities:
                g = torch.Generator().manual_seed(0)
                mask = torch.rand(out_f, in_f, generator=g) < density
                w = torch.randn(out_f, in_f, generator=g) * mask
                layer = SparseLinear.from_dense(w, mask)
                csr = w.to_sparse_csr()
                for tokens in a.tokens:
                    x = torch.randn(tokens, in_f, generator=g)

                    def ours(few, kernel="scalar"):
                        ops.set_csr_few_tokens(few)
                        ops.set_csr_few_tokens_kernel(kernel)
                        return ops.csr_linear(x, layer.values, layer.row_ptr, layer.col_idx, out_f, in_f, None)

                    providers = {"few": lambda: ours(min(8, tokens)), "tiled": lambda: ours(0),
                                 "mkl": lambda: torch.sparse.mm(csr, x.t()), "dense": lambda: F.linear(x, w)}
                    if gather:
                        providers["gather"] = lambda: ours(min(8, tokens), "gather")
                    times = {k: [] for k in providers}
                    with torch.inference_mode(), kernel_policy("sparse"):
                        for fn in providers.values():  # warm-up, and the results agree
                            fn()
                        for k in ("few", "gather")[:1 + gather]:
                            torch.testing.assert_close(providers[k](), providers["dense"](), rtol=1e-4, atol=1e-3)
                        for _ in range(a.rounds):
                            for k, fn in providers.items():
                                times[k].append(timed(fn, a.calls))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    limit = 6 * layer.nnz / (4 * out_f * in_f) if layer.col_idx.element_size() == 2 else \
                        8 * layer.nnz / (4 * out_f * in_f)
                    g_cell = f"{med['gather'] / med['dense']:.2f}x" if gather else "-"
                    print(f"| {in_f}->{out_f} | {density:g} | {tokens} | {med['few'] / med['dense']:.2f}x | {g_cell} | "
                          f"{med['tiled'] / med['dense']:.2f}x | {med['mkl'] / med['dense']:.2f}x | {limit:.2f}x | "
                          f"{med['dense'] * 1e6:.0f} us |", flush=True)
    finally:
        ops.set_csr_few_tokens(before)
        ops.set_csr_few_tokens_kernel(before_kernel)


if __name__ == "__main__":
    main()
