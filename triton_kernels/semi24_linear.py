"""Triton kernels for the 2:4 ops (the CUDA bodies of sparse_t5::semi24_linear,
semi24_linear_backward_input and semi24_sddmm; CPU bodies: csrc/semi24_linear.cpp).

Layout (csrc/cpu/kernel_api.h): values [out, in/2]; meta [out, ceil(in/8)] uint8, one nibble per
group of 4 inputs (group g in byte g // 2, low nibble for even g; bits 0-1 and 2-3 are the two kept
positions, first < second).

- forward and dX: each program decompresses [BLOCK_N, BLOCK_K] tiles of W into registers/SRAM
  (the kept values placed at their nibble positions, zeros elsewhere) and multiplies them with
  tl.dot in the input dtype, accumulating in fp32. BLOCK_K is a multiple of 8 so a tile holds whole metadata bytes.
- dvalues: the CSR SDDMM kernel (triton_kernels/csr_linear.py) on a column index decoded from the
  metadata (the CPU path has a kernel that reads the metadata directly).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparse_t5.formats import semi24_meta_width, semi24_positions, validate_semi24_structure_once

from .autotune import autotune
from . import transient_dense
from .csr_linear import CALLS, _bucket, _check_activation, _check_bias, check_same_device, launch_sddmm, use_dense

CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
           for bm, bn, bk, w, s in ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 2))]
# tl.dot needs every block dimension >= 16; two configs so the interpreter's autotuner benchmarks.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1),
                       triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1)]
KEY = ["T_BUCKET", "IN", "OUT"]


@triton.jit
def _decompress_tile(values_ptr, meta_ptr, n, k, OUT, IN, META_STRIDE):
    """The dense W[n, k] tile (fp32): n is [BN] output rows, k is [BK] input columns."""
    group = k // 4
    pos = k % 4
    n_mask = n < OUT
    k_mask = k < IN
    mask = n_mask[:, None] & k_mask[None, :]
    byte = tl.load(meta_ptr + n[:, None].to(tl.int64) * META_STRIDE + (group // 2)[None, :], mask=mask, other=0)
    nib = (byte.to(tl.int32) >> ((group % 2) * 4)[None, :]) & 15
    first = nib & 3
    second = nib >> 2
    base = values_ptr + n[:, None].to(tl.int64) * (IN // 2) + (2 * group)[None, :]
    v0 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    p = pos[None, :]
    return tl.where(p == first, v0, tl.where(p == second, v1, 0.0))


@autotune(CONFIGS, INTERPRETER_CONFIGS, KEY, reset_to_zero=[])  # each y tile is stored once
@triton.jit
def _semi24_forward_kernel(x_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, T, IN, OUT, META_STRIDE, T_BUCKET,
                           HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + m[:, None].to(tl.int64) * IN + k[None, :], mask=(m[:, None] < T) & (k[None, :] < IN),
                     other=0.0)
        w = _decompress_tile(values_ptr, meta_ptr, n, k, OUT, IN, META_STRIDE)
        acc += tl.dot(xs, tl.trans(w.to(xs.dtype)), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n < OUT, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None].to(tl.int64) * OUT + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < T) & (n[None, :] < OUT))


@autotune(CONFIGS, INTERPRETER_CONFIGS, KEY, reset_to_zero=[])  # each dx tile is stored once
@triton.jit
def _semi24_backward_input_kernel(dy_ptr, values_ptr, meta_ptr, dx_ptr, T, IN, OUT, META_STRIDE, T_BUCKET,
                                  PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    # dx[m, k] = sum_n dy[m, n] W[n, k]; here BLOCK_N tiles the input features k and BLOCK_K the rows n.
    pm = tl.program_id(0)
    pk = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pk * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, OUT, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        g = tl.load(dy_ptr + m[:, None].to(tl.int64) * OUT + n[None, :], mask=(m[:, None] < T) & (n[None, :] < OUT),
                    other=0.0)
        w = _decompress_tile(values_ptr, meta_ptr, n, k, OUT, IN, META_STRIDE)  # [BLOCK_K rows, BLOCK_N cols]
        acc += tl.dot(g, w.to(g.dtype), input_precision=PRECISION)
    tl.store(dx_ptr + m[:, None].to(tl.int64) * IN + k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(m[:, None] < T) & (k[None, :] < IN))


# ---- launchers --------------------------------------------------------------------------------------
def _precision(dtype):
    # fp32 inputs: exact fp32 products (tl.dot would otherwise use TF32 on a GPU and miss the fp32
    # tolerance); fp16 / bf16: tensor cores with fp32 accumulation.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_semi24(values, meta):
    """values [out, in/2] and meta; the metadata is validated once per version (as CSR structures are)."""
    if values.dim() != 2:
        raise ValueError(f"sparse_t5: 2:4 values must be 2-D [out, in/2], got shape {tuple(values.shape)}")
    out_features, in_features = values.shape[0], values.shape[1] * 2
    validate_semi24_structure_once(values, meta, (out_features, in_features))
    return out_features, in_features


def semi24_linear(x, values, meta, bias=None):
    CALLS["semi24_linear"] += 1
    check_same_device(x=x, values=values, meta=meta, bias=bias)
    out_features, in_features = _check_semi24(values, meta)
    _check_activation(x, values, in_features, "x", "in_features")
    _check_bias(bias, values, out_features)
    x2 = x.reshape(-1, in_features).contiguous()
    T = x2.shape[0]
    if T and out_features and use_dense("semi24_linear", x.dtype, T, out_features, in_features, values.numel()):
        return transient_dense.semi24_linear(x2, values, meta, bias).reshape(*x.shape[:-1], out_features)
    y = torch.empty(T, out_features, device=x.device, dtype=x.dtype)
    if T and out_features:
        grid = lambda meta_: (triton.cdiv(T, meta_["BLOCK_M"]), triton.cdiv(out_features, meta_["BLOCK_N"]))  # noqa: E731
        _semi24_forward_kernel[grid](x2, values.contiguous(), meta.contiguous(),
                                     bias if bias is not None else values, y, T, in_features, out_features,
                                     semi24_meta_width(in_features), _bucket(T), HAS_BIAS=bias is not None,
                                     PRECISION=_precision(x.dtype))
    return y.reshape(*x.shape[:-1], out_features)


def semi24_linear_backward_input(grad_out, values, meta):
    CALLS["semi24_linear_backward_input"] += 1
    check_same_device(grad_out=grad_out, values=values, meta=meta)
    out_features, in_features = _check_semi24(values, meta)
    _check_activation(grad_out, values, out_features, "grad_out", "out_features")
    g2 = grad_out.reshape(-1, out_features).contiguous()
    T = g2.shape[0]
    if T and in_features and use_dense("semi24_linear_backward_input", g2.dtype, T, out_features, in_features,
                                       values.numel()):
        dx = transient_dense.semi24_linear_backward_input(g2, values, meta)
        return dx.reshape(*grad_out.shape[:-1], in_features)
    dx = torch.empty(T, in_features, device=g2.device, dtype=grad_out.dtype)
    if T and in_features:
        grid = lambda meta_: (triton.cdiv(T, meta_["BLOCK_M"]), triton.cdiv(in_features, meta_["BLOCK_N"]))  # noqa: E731
        _semi24_backward_input_kernel[grid](g2, values.contiguous(), meta.contiguous(), dx, T, in_features,
                                            out_features, semi24_meta_width(in_features), _bucket(T),
                                            PRECISION=_precision(grad_out.dtype))
    return dx.reshape(*grad_out.shape[:-1], in_features)


def decode_columns(meta, out_features, in_features):
    """(row_ptr int32, col_idx int32) of the CSR view of a 2:4 weight, computed on meta's device."""
    cols = semi24_positions(meta, (out_features, in_features), torch.int32).reshape(-1)
    row_ptr = torch.arange(out_features + 1, device=meta.device, dtype=torch.int32) * (in_features // 2)
    return row_ptr, cols.contiguous()


def semi24_sddmm(grad_out, x, meta):
    CALLS["semi24_sddmm"] += 1
    check_same_device(grad_out=grad_out, x=x, meta=meta)
    out_features, in_features = meta.shape[0], x.shape[-1]
    if in_features % 4 or meta.dim() != 2 or meta.shape[1] != semi24_meta_width(in_features):
        raise ValueError(f"sparse_t5: 2:4 meta of shape {tuple(meta.shape)} does not fit x with {in_features} features")
    if grad_out.shape[-1] != out_features or grad_out.shape[:-1] != x.shape[:-1] or grad_out.dtype != x.dtype:
        raise ValueError(f"sparse_t5: grad_out {tuple(grad_out.shape)} {grad_out.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype} and {out_features} outputs")
    # Validate the metadata (once per version) before decoding columns from it; the decoded CSR view is
    # valid by construction, every row holding in/2 values.
    stand_in = x.new_empty(1, 1).expand(out_features, in_features // 2)  # shape and dtype only, no allocation
    validate_semi24_structure_once(stand_in, meta, (out_features, in_features))
    T = x.numel() // max(1, in_features)
    if T and out_features and use_dense("semi24_sddmm", x.dtype, T, out_features, in_features,
                                        out_features * in_features // 2):
        return transient_dense.semi24_sddmm(grad_out.reshape(-1, out_features).contiguous(),
                                            x.reshape(-1, in_features).contiguous(), meta)
    row_ptr, cols = decode_columns(meta, out_features, in_features)
    dvalues = launch_sddmm(grad_out, x, row_ptr, cols, out_features, in_features, in_features // 2)
    return dvalues.reshape(out_features, in_features // 2)
