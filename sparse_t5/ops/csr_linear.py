"""Python side of the CSR ops: fake (meta) rules, autograd, and a typed wrapper.

Schemas are defined once, in csrc/registration.cpp. CPU bodies: csrc/csr_linear.cpp.
Kernels: csrc/cpu/csr_kernels_impl.h. Tests: tests/test_csr_linear.py.
Benchmarks: benches/test_bench_csr_linear.py.
"""
from __future__ import annotations

import torch

from .._extension import _C  # noqa: F401  (loads the library that defines the schemas, after the torch check)

_ops = torch.ops.sparse_t5


def check_one_device(*tensors):
    """Every tensor argument on one device. A call that mixes a CPU tensor with a meta one would
    otherwise dispatch to these fake rules and return a meta tensor instead of an error (found by
    tests/test_ops_fuzz.py)."""
    devices = {t.device for t in tensors if t is not None}
    torch._check_value(len(devices) <= 1,
                       lambda: f"sparse_t5: all tensor arguments must be on one device, got {sorted(map(str, devices))}")


def _check_csr_shapes(values_len, row_ptr, col_idx, out_features, in_features):
    torch._check(row_ptr.dim() == 1 and row_ptr.shape[0] == out_features + 1,
                 lambda: f"sparse_t5: row_ptr must have shape [{out_features + 1}], got {tuple(row_ptr.shape)}")
    torch._check(col_idx.dim() == 1 and col_idx.shape[0] == values_len,
                 lambda: f"sparse_t5: col_idx must have shape [{values_len}], got {tuple(col_idx.shape)}")


@torch.library.register_fake("sparse_t5::csr_linear")
def _csr_linear_fake(x, values, row_ptr, col_idx, out_features, in_features, bias=None):
    check_one_device(x, values, row_ptr, col_idx, bias)
    torch._check(x.shape[-1] == in_features,
                 lambda: f"sparse_t5: x has {x.shape[-1]} features, the weight has in_features={in_features}")
    torch._check(values.dim() == 1, lambda: "sparse_t5: values must be 1-D")
    _check_csr_shapes(values.shape[0], row_ptr, col_idx, out_features, in_features)
    torch._check(x.dtype == values.dtype, lambda: f"sparse_t5: x dtype {x.dtype} != values dtype {values.dtype}")
    if bias is not None:
        torch._check(bias.shape == (out_features,), lambda: f"sparse_t5: bias must have shape [{out_features}]")
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("sparse_t5::csr_linear_backward_input")
def _csr_linear_backward_input_fake(grad_out, values, row_ptr, col_idx, out_features, in_features):
    check_one_device(grad_out, values, row_ptr, col_idx)
    torch._check(grad_out.shape[-1] == out_features,
                 lambda: f"sparse_t5: grad_out has {grad_out.shape[-1]} features, out_features={out_features}")
    _check_csr_shapes(values.shape[0], row_ptr, col_idx, out_features, in_features)
    return grad_out.new_empty((*grad_out.shape[:-1], in_features))


@torch.library.register_fake("sparse_t5::csr_sddmm")
def _csr_sddmm_fake(grad_out, x, row_ptr, col_idx, out_features, in_features):
    check_one_device(grad_out, x, row_ptr, col_idx)
    torch._check(grad_out.shape[:-1] == x.shape[:-1],
                 lambda: "sparse_t5: grad_out and x must have the same leading dimensions")
    _check_csr_shapes(col_idx.shape[0], row_ptr, col_idx, out_features, in_features)
    return x.new_empty((col_idx.shape[0],))


def bias_grad(grad_out, bias_dtype):
    """Sum of grad_out over every leading dimension, accumulated in fp32 so that a bf16 bias
    gradient over many tokens does not lose precision."""
    return grad_out.reshape(-1, grad_out.shape[-1]).sum(0, dtype=torch.float32).to(bias_dtype)


def _csr_linear_setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, out_features, in_features, bias = inputs
    # Save only what the requested gradients need: x for dvalues, values for dx.
    ctx.save_for_backward(
        x if ctx.needs_input_grad[1] else None,
        values if ctx.needs_input_grad[0] else None,
        row_ptr,
        col_idx,
    )
    ctx.out_features = out_features
    ctx.in_features = in_features
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _csr_linear_backward(ctx, grad_out):
    x, values, row_ptr, col_idx = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _ops.csr_linear_backward_input(grad_out, values, row_ptr, col_idx, ctx.out_features, ctx.in_features)
    if ctx.needs_input_grad[1]:
        dvalues = _ops.csr_sddmm(grad_out, x, row_ptr, col_idx, ctx.out_features, ctx.in_features)
    # needs_input_grad has an entry for bias only when the call passed one.
    if len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]:
        dbias = bias_grad(grad_out, ctx.bias_dtype)
    return (dx, dvalues, None, None, None, None, dbias)[: len(ctx.needs_input_grad)]


torch.library.register_autograd(
    "sparse_t5::csr_linear", _csr_linear_backward, setup_context=_csr_linear_setup_context
)


def csr_linear(x, values, row_ptr, col_idx, out_features: int, in_features: int, bias=None):
    """y = x @ W^T + bias for W in CSR form; differentiable in x, values and bias."""
    return _ops.csr_linear(x, values, row_ptr, col_idx, out_features, in_features, bias)


def cpu_isa() -> str:
    """The CPU kernel variant in use: baseline, avx2 or avx512 (SPARSE_T5_CPU_ISA overrides)."""
    return _ops.cpu_isa()
