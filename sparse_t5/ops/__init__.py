"""sparse_t5 ops, registered under torch.ops.sparse_t5.

One module per op family, each with its fake rule and autograd next to a typed wrapper:
  csr_linear.py     CSR forward, dX (transposed product) and dvalues (SDDMM)
  semi24_linear.py  2:4 forward, dX and dvalues
  dense_few_tokens.py  a dense forward for 1-16 tokens (the lm_head at decoding steps)
  triton_dispatch.py  the Triton kernels as the CUDA bodies of the same ops
"""
from .csr_linear import cpu_isa, csr_linear
from .dense_few_tokens import dense_linear_few_tokens
from .semi24_linear import semi24_linear
from .triton_dispatch import register_defaults as _register_triton

_register_triton()  # CUDA bodies from Triton when CUDA is present (and the interpreter test switch)

__all__ = ["csr_linear", "semi24_linear", "dense_linear_few_tokens", "cpu_isa"]
