"""sparse-t5: pruned T5 that is actually cheaper to fine-tune.

Sparse weights are stored compressed (CSR) and trained through sparse kernels, so only the
nonzeros carry weights, gradients and optimizer state.
"""
from . import hf_compat
from .formats import CSRWeight, Semi24Weight
from .kernel_policy import get_kernel_policy, kernel_policy, set_kernel_policy
from .layers import CSRLinear, Semi24Linear, SparseLinear
from .modeling_t5 import SparseT5ForConditionalGeneration
from .ops import cpu_isa, csr_linear, semi24_linear
from .pruning import GradualPruner, cubic_sparsity, magnitude_keep

__all__ = ["CSRWeight", "Semi24Weight", "SparseLinear", "CSRLinear", "Semi24Linear", "SparseT5ForConditionalGeneration", "GradualPruner", "cubic_sparsity",
           "magnitude_keep", "csr_linear", "semi24_linear", "cpu_isa", "kernel_policy", "get_kernel_policy", "set_kernel_policy"]
__version__ = "0.1.0"

hf_compat.check_tested_version()
