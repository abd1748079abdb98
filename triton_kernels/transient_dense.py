"""The transient-dense method of the ops on GPU (sparse_t5.kernel_policy chooses it per call): the
weight is decompressed into a dense tensor for this call only, the product runs on the vendor
GEMM (cuBLAS through torch.matmul), and the dense tensor is freed when the call returns. dvalues
is the dense dY^T X gathered at the kept positions. Nothing dense is saved for backward. Peak per
call: one dense copy of the layer (plus, for dvalues, the dense gradient it gathers from).

The CSR decompression and gather are Triton kernels, one program per output row walking its
nonzeros (no per-nonzero row index is built); 2:4 uses torch's scatter / gather on the positions
decoded from the metadata. These memory-bound kernels are not autotuned: one block size serves.
The launchers in csr_linear.py / semi24_linear.py validate every argument before calling here.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from sparse_t5.formats import semi24_positions

BLOCK = 128
# Calls per op of this method, so tests can check which method ran.
CALLS: collections.Counter = collections.Counter()


@triton.jit
def _csr_to_dense_kernel(values_ptr, row_ptr_ptr, col_ptr, dense_ptr, IN, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    for k0 in range(start, end, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < end
        cols = tl.load(col_ptr + k, mask=mask, other=0).to(tl.int64)
        vals = tl.load(values_ptr + k, mask=mask, other=0.0)
        tl.store(dense_ptr + r.to(tl.int64) * IN + cols, vals, mask=mask)


@triton.jit
def _csr_gather_kernel(dense_ptr, row_ptr_ptr, col_ptr, out_ptr, IN, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    for k0 in range(start, end, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        mask = k < end
        cols = tl.load(col_ptr + k, mask=mask, other=0).to(tl.int64)
        vals = tl.load(dense_ptr + r.to(tl.int64) * IN + cols, mask=mask, other=0.0)
        tl.store(out_ptr + k, vals.to(out_ptr.dtype.element_ty), mask=mask)


def csr_to_dense(values, row_ptr, col_idx, out_features, in_features):
    dense = torch.zeros(out_features, in_features, device=values.device, dtype=values.dtype)
    if values.numel() and out_features:
        _csr_to_dense_kernel[(out_features,)](values.contiguous(), row_ptr, col_idx, dense, in_features, BLOCK=BLOCK)
    return dense


def csr_gather(dense, row_ptr, col_idx, out_features, in_features, dtype):
    out = torch.empty(col_idx.numel(), device=dense.device, dtype=dtype)
    if col_idx.numel() and out_features:
        _csr_gather_kernel[(out_features,)](dense.contiguous(), row_ptr, col_idx, out, in_features, BLOCK=BLOCK)
    return out


def semi24_to_dense(values, meta, out_features, in_features):
    positions = semi24_positions(meta, (out_features, in_features))
    dense = torch.zeros(out_features, in_features, device=values.device, dtype=values.dtype)
    return dense.scatter_(1, positions, values)


# ---- the ops' dense method, on 2-D activations [T, features] -------------------------------------------
def csr_linear(x2, values, row_ptr, col_idx, out_features, in_features, bias):
    CALLS["csr_linear"] += 1
    return torch.nn.functional.linear(x2, csr_to_dense(values, row_ptr, col_idx, out_features, in_features), bias)


def csr_linear_backward_input(g2, values, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_linear_backward_input"] += 1
    return g2 @ csr_to_dense(values, row_ptr, col_idx, out_features, in_features)


def csr_sddmm(g2, x2, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_sddmm"] += 1
    return csr_gather(g2.t() @ x2, row_ptr, col_idx, out_features, in_features, x2.dtype)


def semi24_linear(x2, values, meta, bias):
    CALLS["semi24_linear"] += 1
    out_features, in_features = values.shape[0], values.shape[1] * 2
    return torch.nn.functional.linear(x2, semi24_to_dense(values, meta, out_features, in_features), bias)


def semi24_linear_backward_input(g2, values, meta):
    CALLS["semi24_linear_backward_input"] += 1
    out_features, in_features = values.shape[0], values.shape[1] * 2
    return g2 @ semi24_to_dense(values, meta, out_features, in_features)


def semi24_sddmm(g2, x2, meta):
    CALLS["semi24_sddmm"] += 1
    out_features, in_features = meta.shape[0], x2.shape[1]
    positions = semi24_positions(meta, (out_features, in_features))
    return (g2.t() @ x2).gather(1, positions)
