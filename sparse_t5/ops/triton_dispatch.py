"""Registers the Triton kernels (triton_kernels/, installed as sparse_t5_triton) as the CUDA
implementations of the sparse_t5:: ops, so SparseLinear and the T5 model run unchanged on CUDA
tensors and torch.compile sees the same ops.

Test entry point: with SPARSE_T5_TRITON_ON_CPU=1 (and TRITON_INTERPRET=1), the Triton kernels are
registered for CPU tensors too, replacing the C++ bodies in that process, so the op-level tests run
through Triton's interpreter (tests/test_triton_kernels.py does this).
"""
from __future__ import annotations

import os

import torch

_REGISTERED: set[str] = set()


def _import_kernels():
    try:
        from sparse_t5_triton import csr_linear as csr, semi24_linear as semi24
    except ImportError:  # running from a source tree without the package installed
        from triton_kernels import csr_linear as csr, semi24_linear as semi24
    return csr, semi24


def register(device_type: str) -> bool:
    """Register the Triton bodies for `device_type`; False if Triton is not installed."""
    if device_type in _REGISTERED:
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    csr, semi24 = _import_kernels()
    kernels = {
        "csr_linear": csr.csr_linear,
        "csr_linear_backward_input": csr.csr_linear_backward_input,
        "csr_sddmm": csr.csr_sddmm,
        "semi24_linear": semi24.semi24_linear,
        "semi24_linear_backward_input": semi24.semi24_linear_backward_input,
        "semi24_sddmm": semi24.semi24_sddmm,
    }
    for name, fn in kernels.items():
        torch.library.register_kernel(f"sparse_t5::{name}", device_type, fn)
    _REGISTERED.add(device_type)
    return True


def register_defaults() -> None:
    if os.environ.get("SPARSE_T5_TRITON_ON_CPU") == "1":
        register("cpu")
    if torch.cuda.is_available():
        register("cuda")
