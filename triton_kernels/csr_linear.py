"""Triton kernels for the CSR ops (the CUDA bodies of sparse_t5::csr_linear,
csr_linear_backward_input and csr_sddmm; CPU bodies: csrc/csr_linear.cpp).

Kernels first (forward, dX, dvalues), then their launchers. All accumulate in fp32 and take
fp32 / fp16 / bf16 inputs. Indices are loaded as integers and used as offsets from a base
pointer (no pointer is ever loaded from memory), which also keeps them runnable in Triton's
interpreter (TRITON_INTERPRET=1) on CPU tensors, where the tests run them.

- forward: one program per (output row, token block); it walks the row's nonzeros in chunks of
  BLOCK_K, gathers x[tokens, cols] and reduces over the chunk.
- dX = dY W: one program per (row, token block) scatters dY[:, r] * W[r, c] into dX with fp32
  atomics. Why atomics: the alternative, a transposed (CSC) copy of the index, costs 6-8 more bytes
  per nonzero, which is most of the memory this project exists to save (GUIDE section 1).
- dvalues (SDDMM): one program per (row, nonzero block) reduces dY[:, r] * x[:, cols] over tokens.
"""
from __future__ import annotations

import collections
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launches per op, so tests can check that an op really went through Triton.
CALLS: collections.Counter = collections.Counter()


def _configs(kind):
    if INTERPRET:  # the interpreter would benchmark every config: one is enough to check correctness
        return [triton.Config({"BLOCK_T": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w)
            for bt, bk, w in ((32, 32, 4), (64, 32, 4), (64, 64, 8), (128, 32, 8))]


def _bucket(n):
    """Autotune key bucket: the next power of two, so that nearby sizes share a tuned config."""
    return 1 << max(0, int(n - 1).bit_length())


@triton.autotune(configs=_configs("fwd"), key=["T_BUCKET", "IN", "OUT", "NNZ_BUCKET"])
@triton.jit
def _csr_forward_kernel(x_ptr, values_ptr, row_ptr_ptr, col_ptr, bias_ptr, y_ptr, T, IN, OUT,
                        T_BUCKET, NNZ_BUCKET, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < end
        cols = tl.load(col_ptr + k, mask=k_mask, other=0).to(tl.int64)
        vals = tl.load(values_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + t[:, None].to(tl.int64) * IN + cols[None, :],
                     mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(xs * vals[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * OUT + r, acc.to(y_ptr.dtype.element_ty), mask=t_mask)


@triton.autotune(configs=_configs("dx"), key=["T_BUCKET", "IN", "OUT", "NNZ_BUCKET"])
@triton.jit
def _csr_backward_input_kernel(dy_ptr, values_ptr, row_ptr_ptr, col_ptr, dx_ptr, T, IN, OUT, T_BUCKET,
                               NNZ_BUCKET, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    tb = tl.program_id(1)
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    g = tl.load(dy_ptr + t.to(tl.int64) * OUT + r, mask=t_mask, other=0.0).to(tl.float32)
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    for k0 in range(start, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < end
        cols = tl.load(col_ptr + k, mask=k_mask, other=0).to(tl.int64)
        vals = tl.load(values_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        tl.atomic_add(dx_ptr + t[:, None].to(tl.int64) * IN + cols[None, :], g[:, None] * vals[None, :],
                      mask=t_mask[:, None] & k_mask[None, :])


@triton.autotune(configs=_configs("sddmm"), key=["T_BUCKET", "IN", "OUT", "NNZ_BUCKET"])
@triton.jit
def _csr_sddmm_kernel(dy_ptr, x_ptr, row_ptr_ptr, col_ptr, out_ptr, T, IN, OUT, T_BUCKET, NNZ_BUCKET,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    r = tl.program_id(0)
    kb = tl.program_id(1)
    start = tl.load(row_ptr_ptr + r)
    end = tl.load(row_ptr_ptr + r + 1)
    k = start + kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < end
    if start + kb * BLOCK_K < end:
        cols = tl.load(col_ptr + k, mask=k_mask, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_mask = t < T
            g = tl.load(dy_ptr + t.to(tl.int64) * OUT + r, mask=t_mask, other=0.0).to(tl.float32)
            xs = tl.load(x_ptr + t[:, None].to(tl.int64) * IN + cols[None, :],
                         mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(xs * g[:, None], axis=0)
        tl.store(out_ptr + k, acc.to(out_ptr.dtype.element_ty), mask=k_mask)


# ---- launchers --------------------------------------------------------------------------------------
def _check(x, values, row_ptr, col_idx, in_features, what="x"):
    if x.shape[-1] != in_features:
        raise ValueError(f"sparse_t5: {what} has {x.shape[-1]} features, expected {in_features}")
    if x.dtype != values.dtype:
        raise TypeError(f"sparse_t5: {what} dtype {x.dtype} does not match values dtype {values.dtype}")
    if not (x.device == values.device == row_ptr.device == col_idx.device):
        raise ValueError("sparse_t5: all tensors must be on the same device")


def _max_row_nnz(row_ptr):
    return int((row_ptr[1:] - row_ptr[:-1]).max()) if row_ptr.numel() > 1 else 0


def csr_linear(x, values, row_ptr, col_idx, out_features, in_features, bias=None):
    CALLS["csr_linear"] += 1
    _check(x, values, row_ptr, col_idx, in_features)
    x2 = x.reshape(-1, in_features).contiguous()
    T = x2.shape[0]
    y = torch.empty(T, out_features, device=x.device, dtype=x.dtype)
    if T and out_features:
        grid = lambda meta: (out_features, triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
        _csr_forward_kernel[grid](x2, values.contiguous(), row_ptr, col_idx,
                                  bias if bias is not None else values, y, T, in_features, out_features,
                                  _bucket(T), _bucket(values.numel()), HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], out_features)


def csr_linear_backward_input(grad_out, values, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_linear_backward_input"] += 1
    _check(grad_out, values, row_ptr, col_idx, out_features, "grad_out")
    g2 = grad_out.reshape(-1, out_features).contiguous()
    T = g2.shape[0]
    dx = torch.zeros(T, in_features, device=g2.device, dtype=torch.float32)  # atomics accumulate in fp32
    if T and values.numel():
        grid = lambda meta: (out_features, triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
        _csr_backward_input_kernel[grid](g2, values.contiguous(), row_ptr, col_idx, dx, T, in_features,
                                         out_features, _bucket(T), _bucket(values.numel()))
    return dx.to(grad_out.dtype).reshape(*grad_out.shape[:-1], in_features)


def csr_sddmm(grad_out, x, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_sddmm"] += 1
    g2 = grad_out.reshape(-1, out_features).contiguous()
    x2 = x.reshape(-1, in_features).contiguous()
    if g2.shape[0] != x2.shape[0]:
        raise ValueError("sparse_t5: grad_out and x must have the same leading dimensions")
    nnz = col_idx.numel()
    out = torch.empty(nnz, device=x.device, dtype=x.dtype)
    if nnz == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    max_row = max(1, _max_row_nnz(row_ptr))
    grid = lambda meta: (out_features, triton.cdiv(max_row, meta["BLOCK_K"]))  # noqa: E731
    _csr_sddmm_kernel[grid](g2, x2, row_ptr, col_idx, out, g2.shape[0], in_features, out_features,
                            _bucket(g2.shape[0]), _bucket(nnz))
    return out
