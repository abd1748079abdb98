"""Registers the Triton kernels (triton_kernels/, installed as sparse_t5_triton) as the CUDA
implementations of the sparse_t5:: ops, so SparseLinear and the T5 model run unchanged on CUDA
tensors and torch.compile sees the same ops.

The registration is lazy: each registered body imports its kernel module on first call. Importing
sparse_t5 therefore never imports Triton, and the kernel modules (which import sparse_t5.formats)
can be imported first without a circular import.

Test entry point: with SPARSE_T5_TRITON_ON_CPU=1 (and TRITON_INTERPRET=1), the Triton kernels are
registered for CPU tensors too, replacing the C++ bodies in that process, so the op-level tests run
through Triton's interpreter (tests/test_triton_kernels.py does this).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

_REGISTERED: set[str] = set()
# op name -> module of sparse_t5_triton that holds its launcher (same name as the op)
KERNEL_MODULES = {
    "csr_linear": "csr_linear",
    "csr_linear_backward_input": "csr_linear",
    "csr_sddmm": "csr_linear",
    "semi24_linear": "semi24_linear",
    "semi24_linear_backward_input": "semi24_linear",
    "semi24_sddmm": "semi24_linear",
}


def _lazy_launcher(module: str, name: str):
    def launch(*args, **kwargs):
        return getattr(importlib.import_module(f"sparse_t5_triton.{module}"), name)(*args, **kwargs)

    launch.__name__ = f"triton_{name}"
    return launch


def register(device_type: str) -> bool:
    """Register the Triton bodies for `device_type`; False if Triton is not installed."""
    if device_type in _REGISTERED:
        return True
    if importlib.util.find_spec("triton") is None:
        return False
    for name, module in KERNEL_MODULES.items():
        torch.library.register_kernel(f"sparse_t5::{name}", device_type, _lazy_launcher(module, name))
    _REGISTERED.add(device_type)
    return True


def register_defaults() -> None:
    if os.environ.get("SPARSE_T5_TRITON_ON_CPU") == "1":
        register("cpu")
    if torch.cuda.is_available():
        register("cuda")
