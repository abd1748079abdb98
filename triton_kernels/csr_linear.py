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
  per nonzero, which is most of the memory this project exists to save (README "How the CSR
  kernels work").
- dvalues (SDDMM): one program per (row, nonzero block) reduces dY[:, r] * x[:, cols] over tokens.
"""
from __future__ import annotations

import collections

import torch
import triton
import triton.language as tl

from sparse_t5.formats import validate_csr_structure_once

from . import transient_dense
from .autotune import autotune

# Launches per op, so tests can check that an op really went through Triton.
CALLS: collections.Counter = collections.Counter()

CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=w)
           for bt, bk, w in ((32, 32, 4), (64, 32, 4), (64, 64, 8), (128, 32, 8))]
# Two small configs: the interpreter is slow, and two are what make the autotuner benchmark.
INTERPRETER_CONFIGS = [triton.Config({"BLOCK_T": 16, "BLOCK_K": 16}, num_warps=1),
                       triton.Config({"BLOCK_T": 8, "BLOCK_K": 32}, num_warps=1)]
KEY = ["T_BUCKET", "IN", "OUT", "NNZ_BUCKET"]


def _bucket(n):
    """Autotune key bucket: the next power of two, so that nearby sizes share a tuned config."""
    return 1 << max(0, int(n - 1).bit_length())


@autotune(CONFIGS, INTERPRETER_CONFIGS, KEY, reset_to_zero=[])  # stores each y element once
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


# Accumulates into dx with atomics: every benchmark launch must start from zeros.
@autotune(CONFIGS, INTERPRETER_CONFIGS, KEY, reset_to_zero=["dx_ptr"])
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


@autotune(CONFIGS, INTERPRETER_CONFIGS, KEY, reset_to_zero=[])  # stores each dvalue once
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
# Every call checks shapes, dtypes and devices (cheap, no sync); the CSR structure is validated the
# first time a layer's row_ptr / col_idx are seen and again only if they change
# (formats.validate_csr_structure_once), so malformed input raises the same ValueError as the CPU ops
# instead of sending the gathers out of bounds.
def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("sparse_t5: all tensors must be on the same device, got "
                         + ", ".join(f"{name} on {d}" for name, d in devices.items()))


def _check_activation(x, values, features, what, features_name):
    if x.shape[-1] != features:
        raise ValueError(f"sparse_t5: {what} has {x.shape[-1]} features, expected {features_name}={features}")
    if x.dtype != values.dtype:
        raise TypeError(f"sparse_t5: {what} dtype {x.dtype} does not match values dtype {values.dtype}")


def _check_bias(bias, values, out_features):
    if bias is None:
        return
    if bias.shape != (out_features,):
        raise ValueError(f"sparse_t5: bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if bias.dtype != values.dtype:
        raise TypeError(f"sparse_t5: bias dtype {bias.dtype} does not match values dtype {values.dtype}")


def _check_csr(values, row_ptr, col_idx, out_features, in_features):
    validate_csr_structure_once(values, row_ptr, col_idx, (out_features, in_features))


def use_dense(op, dtype, tokens, out_features, in_features, nnz):
    """The kernel policy's choice for this call (sparse_t5.kernel_policy; the "cuda" table and rule,
    also for CPU tensors under the interpreter test entry point): True runs transient dense."""
    density = nnz / max(1, out_features * in_features)
    return torch.ops.sparse_t5.choose_method("cuda", op, dtype, max(1, tokens), max(1, out_features),
                                             max(1, in_features), max(density, 1e-9)) == "dense"


def _max_row_nnz(row_ptr):
    return int((row_ptr[1:] - row_ptr[:-1]).max()) if row_ptr.numel() > 1 else 0


def csr_linear(x, values, row_ptr, col_idx, out_features, in_features, bias=None):
    CALLS["csr_linear"] += 1
    check_same_device(x=x, values=values, row_ptr=row_ptr, col_idx=col_idx, bias=bias)
    _check_activation(x, values, in_features, "x", "in_features")
    _check_bias(bias, values, out_features)
    _check_csr(values, row_ptr, col_idx, out_features, in_features)
    x2 = x.reshape(-1, in_features).contiguous()
    T = x2.shape[0]
    if T and out_features and use_dense("csr_linear", x.dtype, T, out_features, in_features, values.numel()):
        y = transient_dense.csr_linear(x2, values, row_ptr, col_idx, out_features, in_features, bias)
        return y.reshape(*x.shape[:-1], out_features)
    y = torch.empty(T, out_features, device=x.device, dtype=x.dtype)
    if T and out_features:
        grid = lambda meta: (out_features, triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
        _csr_forward_kernel[grid](x2, values.contiguous(), row_ptr, col_idx,
                                  bias if bias is not None else values, y, T, in_features, out_features,
                                  _bucket(T), _bucket(values.numel()), HAS_BIAS=bias is not None)
    return y.reshape(*x.shape[:-1], out_features)


def csr_linear_backward_input(grad_out, values, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_linear_backward_input"] += 1
    check_same_device(grad_out=grad_out, values=values, row_ptr=row_ptr, col_idx=col_idx)
    _check_activation(grad_out, values, out_features, "grad_out", "out_features")
    _check_csr(values, row_ptr, col_idx, out_features, in_features)
    g2 = grad_out.reshape(-1, out_features).contiguous()
    T = g2.shape[0]
    if T and in_features and use_dense("csr_linear_backward_input", g2.dtype, T, out_features, in_features,
                                       values.numel()):
        dx = transient_dense.csr_linear_backward_input(g2, values, row_ptr, col_idx, out_features, in_features)
        return dx.reshape(*grad_out.shape[:-1], in_features)
    # The kernel accumulates with atomics (in fp32): zeroed here on every call, and before every
    # autotuner benchmark launch by reset_to_zero.
    dx = torch.zeros(T, in_features, device=g2.device, dtype=torch.float32)
    if T and values.numel():
        grid = lambda meta: (out_features, triton.cdiv(T, meta["BLOCK_T"]))  # noqa: E731
        _csr_backward_input_kernel[grid](g2, values.contiguous(), row_ptr, col_idx, dx, T, in_features,
                                         out_features, _bucket(T), _bucket(values.numel()))
    return dx.to(grad_out.dtype).reshape(*grad_out.shape[:-1], in_features)


def csr_sddmm(grad_out, x, row_ptr, col_idx, out_features, in_features):
    CALLS["csr_sddmm"] += 1
    check_same_device(grad_out=grad_out, x=x, row_ptr=row_ptr, col_idx=col_idx)
    if grad_out.shape[-1] != out_features or x.shape[-1] != in_features:
        raise ValueError(f"sparse_t5: grad_out must end in out_features={out_features} and x in "
                         f"in_features={in_features}, got {tuple(grad_out.shape)} and {tuple(x.shape)}")
    if grad_out.shape[:-1] != x.shape[:-1]:
        raise ValueError("sparse_t5: grad_out and x must have the same leading dimensions")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"sparse_t5: grad_out dtype {grad_out.dtype} does not match x dtype {x.dtype}")
    nnz = col_idx.numel()
    # values are not an argument: a stand-in (one element, expanded, so nothing is allocated) carries the
    # nnz, dtype and device to check against.
    _check_csr(x.new_empty(1).expand(nnz), row_ptr, col_idx, out_features, in_features)
    T = x.numel() // max(1, in_features)
    if nnz and T and use_dense("csr_sddmm", x.dtype, T, out_features, in_features, nnz):
        return transient_dense.csr_sddmm(grad_out.reshape(-1, out_features), x.reshape(-1, in_features), row_ptr,
                                         col_idx, out_features, in_features)
    return launch_sddmm(grad_out, x, row_ptr, col_idx, out_features, in_features, _max_row_nnz(row_ptr))


def launch_sddmm(grad_out, x, row_ptr, col_idx, out_features, in_features, max_row):
    """The SDDMM on an already validated structure whose longest row has `max_row` nonzeros."""
    nnz = col_idx.numel()
    out = torch.empty(nnz, device=x.device, dtype=x.dtype)
    g2 = grad_out.reshape(-1, out_features).contiguous()
    x2 = x.reshape(-1, in_features).contiguous()
    if nnz == 0:
        return out
    if g2.shape[0] == 0:
        return out.zero_()
    grid = lambda meta: (out_features, triton.cdiv(max(1, max_row), meta["BLOCK_K"]))  # noqa: E731
    _csr_sddmm_kernel[grid](g2, x2, row_ptr, col_idx, out, g2.shape[0], in_features, out_features,
                            _bucket(g2.shape[0]), _bucket(nnz))
    return out
