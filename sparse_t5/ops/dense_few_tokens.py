"""Python side of dense_linear_few_tokens: its fake (meta) rule and a typed wrapper.

y = x W^T for a dense W and 1-16 tokens, reading W once: the model's lm_head at decoding steps, one
token per beam (sparse_t5.modeling_t5.LMHead says when it is taken). Schema: csrc/registration.cpp.
CPU body: csrc/dense_few_tokens.cpp. Kernel: csrc/cpu/dense_kernels_impl.h. Tests:
tests/test_dense_few_tokens.py. Benchmark: benches/lm_head_few_tokens.py. No autograd rule: it serves
calls that need no gradient, and training keeps F.linear.
"""
from __future__ import annotations

import torch

from .._extension import _C  # noqa: F401  (loads the library that defines the schemas, after the torch check)
from .csr_linear import check_one_device

MAX_TOKENS = 16  # csrc/cpu/kernel_api.h, kDenseFewMaxTokens
_ops = torch.ops.sparse_t5


@torch.library.register_fake("sparse_t5::dense_linear_few_tokens")
def _dense_linear_few_tokens_fake(x, weight):
    check_one_device(x, weight)
    torch._check(weight.dim() == 2, lambda: f"sparse_t5: weight must be 2-D, got shape {tuple(weight.shape)}")
    torch._check(x.shape[-1] == weight.shape[1],
                 lambda: f"sparse_t5: x has {x.shape[-1]} features, the weight's in_features is {weight.shape[1]}")
    torch._check(x.dtype == weight.dtype, lambda: f"sparse_t5: x dtype {x.dtype} != weight dtype {weight.dtype}")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def dense_linear_few_tokens(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight[out, in]^T for at most 16 tokens (the product of x's leading dims), fp32 or
    bf16 on CPU, accumulated in fp32. No gradient flows through it."""
    return _ops.dense_linear_few_tokens(x, weight)
