"""sparse-t5: pruned T5 that is actually cheaper to fine-tune.

Sparse weights are stored compressed (CSR) and trained through sparse kernels, so only the
nonzeros carry weights, gradients and optimizer state.
"""
from .formats import CSRWeight
from .layers import SparseLinear
from .ops import cpu_isa, csr_linear

__all__ = ["CSRWeight", "SparseLinear", "csr_linear", "cpu_isa"]
__version__ = "0.1.0"
