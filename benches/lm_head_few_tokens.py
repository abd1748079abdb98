"""The dense lm_head at decoding steps: MKL's GEMM (F.linear) against sparse_t5's few-token op.

    python benches/lm_head_few_tokens.py [--shapes 32128x768 32128x1024] [--tokens 1 2 4 8 10 16 32 256 320] [--rounds 15]

Beam search decodes one token per beam, so at beam 10 the lm_head (not pruned) runs at 10 tokens a
step. For such calls the vendor GEMM packs the whole weight (a copy of 98.7 MB at t5-base's 32128 x
768 in fp32), while dense_linear_few_tokens reads it once (csrc/cpu/dense_kernels_impl.h). For each
shape, dtype and token count it times both alternately in one process (median of --rounds, in
inference mode, at torch's thread count) and prints ms per call, the weight's bytes over the time
(GB/s: the bytes limit is the machine's read bandwidth) and op / F.linear. The model takes the op for
1-16 tokens in fp32 and 1-4 in bf16 (sparse_t5.modeling_t5.LMHead.few_tokens). Above 16 tokens the
op does not run; the column beside it is F.linear over 512-row slices of the weight (LMHead.vocab_chunk),
which fp32 inference takes at 17-256 tokens (LMHead.chunked_tokens: a decoding step of a batch), so
each slice is packed and read back from cache. The last column says which path the model's LMHead takes.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info  # noqa: E402

from sparse_t5.modeling_t5 import LMHead, linear_over_row_slices  # noqa: E402
from sparse_t5.ops import dense_linear_few_tokens  # noqa: E402
from sparse_t5.ops.dense_few_tokens import MAX_TOKENS  # noqa: E402
from sparse_t5.tune import time_interleaved  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["32128x768", "32128x1024"], help="out x in")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 10, 16, 32, 128, 256, 320, 1024])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args(argv)
    print(f"{machine_info()}; {torch.get_num_threads()} threads; median of {a.rounds} alternating rounds\n")
    print("| shape | dtype | tokens | F.linear | op | op GB/s | op / F.linear | F.linear in slices | slices / F.linear "
          "| LMHead takes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in a.shapes:
            out_f, in_f = (int(v) for v in shape.split("x"))
            for dtype in (getattr(torch, d) for d in a.dtypes):
                head = LMHead(in_f, out_f, bias=False, dtype=dtype)
                head.weight.normal_(generator=g)
                w = head.weight
                c = LMHead.vocab_chunk
                for tokens in a.tokens:
                    x = torch.randn(tokens, in_f, generator=g).to(dtype)
                    fns = {"F.linear": lambda: F.linear(x, w),
                           "slices": lambda: linear_over_row_slices(x, w, c)}
                    if tokens <= MAX_TOKENS:
                        fns["op"] = lambda: dense_linear_few_tokens(x, w)
                    t = {k: v * 1e3 for k, v in time_interleaved(fns, a.rounds).items()}
                    op = (f"{t['op']:.2f} ms | {w.numel() * w.element_size() / (t['op'] * 1e-3) / 1e9:.0f} | "
                          f"{t['op'] / t['F.linear']:.2f}x" if "op" in t else "- | - | -")
                    print(f"| {shape} | {str(dtype).removeprefix('torch.')} | {tokens} | {t['F.linear']:.2f} ms | {op} | "
                          f"{t['slices']:.2f} ms | {t['slices'] / t['F.linear']:.2f}x | {takes(head, tokens)} |",
                          flush=True)


def takes(head: LMHead, tokens: int) -> str:
    """Which path LMHead.forward takes for an inference call of `tokens` tokens in the head's dtype."""
    for name, ranges in (("op", head.few_tokens), ("slices", head.chunked_tokens)):
        lo, hi = ranges.get(head.weight.dtype, (0, -1))
        if lo <= tokens <= hi:
            return name
    return "F.linear"


if __name__ == "__main__":
    main()
