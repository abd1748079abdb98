"""Python side of the 2:4 ops: fake (meta) rules, autograd, and a typed wrapper.

Schemas: csrc/registration.cpp. CPU bodies: csrc/semi24_linear.cpp. Kernels:
csrc/cpu/semi24_kernels_impl.h (forward, dx and dvalues). Tests:
tests/test_semi24_linear.py. Benchmarks: benches/test_bench_semi24_linear.py.
"""
from __future__ import annotations

import torch

from .._extension import _C  # noqa: F401  (loads the library that defines the schemas, after the torch check)
from ..formats import semi24_meta_width
from .csr_linear import bias_grad, check_one_device

_ops = torch.ops.sparse_t5


def _check(values, meta, in_features):
    torch._check(values.dim() == 2, lambda: "sparse_t5: 2:4 values must be 2-D [out, in/2]")
    torch._check(in_features % 4 == 0, lambda: f"sparse_t5: 2:4 needs in_features divisible by 4, got {in_features}")
    torch._check(meta.dim() == 2 and meta.shape[0] == values.shape[0]
                 and meta.shape[1] == semi24_meta_width(in_features),
                 lambda: f"sparse_t5: 2:4 meta has shape {tuple(meta.shape)}")


@torch.library.register_fake("sparse_t5::semi24_linear")
def _semi24_linear_fake(x, values, meta, bias=None):
    check_one_device(x, values, meta, bias)
    in_features = values.shape[1] * 2
    _check(values, meta, in_features)
    torch._check(x.shape[-1] == in_features, lambda: f"sparse_t5: x has {x.shape[-1]} features, expected {in_features}")
    torch._check(x.dtype == values.dtype, lambda: f"sparse_t5: x dtype {x.dtype} != values dtype {values.dtype}")
    return x.new_empty((*x.shape[:-1], values.shape[0]))


@torch.library.register_fake("sparse_t5::semi24_linear_backward_input")
def _semi24_backward_input_fake(grad_out, values, meta):
    check_one_device(grad_out, values, meta)
    _check(values, meta, values.shape[1] * 2)
    torch._check(grad_out.shape[-1] == values.shape[0], lambda: "sparse_t5: grad_out features != out_features")
    return grad_out.new_empty((*grad_out.shape[:-1], values.shape[1] * 2))


@torch.library.register_fake("sparse_t5::semi24_sddmm")
def _semi24_sddmm_fake(grad_out, x, meta):
    check_one_device(grad_out, x, meta)
    torch._check(grad_out.shape[:-1] == x.shape[:-1], lambda: "sparse_t5: grad_out and x leading dims differ")
    return x.new_empty((meta.shape[0], x.shape[-1] // 2))


def _setup_context(ctx, inputs, output):
    x, values, meta, bias = (list(inputs) + [None])[:4]
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, values if ctx.needs_input_grad[0] else None, meta)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, grad_out):
    x, values, meta = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _ops.semi24_linear_backward_input(grad_out, values, meta)
    if ctx.needs_input_grad[1]:
        dvalues = _ops.semi24_sddmm(grad_out, x, meta)
    if len(ctx.needs_input_grad) > 3 and ctx.needs_input_grad[3]:
        dbias = bias_grad(grad_out, ctx.bias_dtype)
    return (dx, dvalues, None, dbias)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("sparse_t5::semi24_linear", _backward, setup_context=_setup_context)


def semi24_linear(x, values, meta, bias=None):
    """y = x @ W^T + bias for a 2:4 W (values [out, in/2], meta [out, ceil(in/8)] uint8)."""
    return _ops.semi24_linear(x, values, meta, bias)
