"""Speed of the CSR sparse linear against dense F.linear and torch.sparse (MKL CSR), on T5 shapes.

    pytest benches/test_bench_csr_linear.py

Providers: dense (F.linear on the masked weight), torch_sparse (torch.sparse.mm on a CSR tensor,
with its own autograd for fwd+bwd), cpp (ours). fp32, 512 tokens. Ratios are printed at the end.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from bench_utils import make_runner

from sparse_t5 import SparseLinear

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

TOKENS = 512
SHAPES = {
    "t5-small FFN wi 512->2048": (512, 2048),
    "t5-small FFN wo 2048->512": (2048, 512),
    "t5-base FFN wi 768->3072": (768, 3072),
}
SPARSITIES = [0.5, 0.8, 0.9, 0.95]
PROVIDERS = ["dense", "torch_sparse", "cpp"]


def setup_csr_linear(provider, in_features, out_features, sparsity, backward):
    """One factory per op: returns a zero-argument callable running the op for `provider`."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out_features, in_features, generator=g) >= sparsity
    weight = torch.randn(out_features, in_features, generator=g) * mask
    x = torch.randn(TOKENS, in_features, generator=g, requires_grad=backward)
    dy = torch.randn(TOKENS, out_features, generator=g)
    if provider == "dense":
        w = weight.clone().requires_grad_(backward)
        fwd = lambda: F.linear(x, w)  # noqa: E731
    elif provider == "torch_sparse":
        csr = weight.to_sparse_csr()
        values = csr.values().clone().requires_grad_(backward)

        def fwd():  # the CSR tensor is rebuilt per call so that autograd reaches `values`
            w = torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), values, csr.shape)
            return torch.sparse.mm(w, x.t()).t()
    elif provider == "cpp":
        layer = SparseLinear.from_dense(weight, mask)
        layer.values.requires_grad_(backward)
        fwd = lambda: layer(x)  # noqa: E731
    else:
        raise ValueError(provider)
    return make_runner(fwd, dy, backward)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_csr_linear(record, pass_, shape, sparsity, provider):
    in_features, out_features = SHAPES[shape]
    fn = setup_csr_linear(provider, in_features, out_features, sparsity, backward=pass_ == "fwd+bwd")
    record(f"csr_linear {pass_} {shape} s={sparsity}", provider, fn)
