"""Speed of the CSR sparse linear against dense F.linear and torch.sparse (MKL CSR), on T5 shapes.

    pytest benches/test_bench_csr_linear.py

Providers: dense (F.linear on the masked weight), torch_sparse (torch.sparse.mm on a CSR tensor,
with its own autograd for fwd+bwd), cpp (ours, under the auto kernel policy). fp32, 1 to 512
tokens. Ratios are printed at the end, each group with the limit it reads against:
- up to 32 tokens, the bytes limit: dense reads 4 B per weight, ours 6 B per kept weight (fp32
  value + int16 column), in the forward, in dX and in dW alike, so at most 4 / (6 x density) of
  dense's speed;
- from 256 tokens, the FLOPs limit: density of dense's multiply-adds, so at most 1 / density.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F

from bench_utils import make_runner

from sparse_t5 import SparseLinear

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

TOKENS = [1, 8, 32, 256, 512]
SHAPES = {
    "t5-small FFN wi 512->2048": (512, 2048),
    "t5-small FFN wo 2048->512": (2048, 512),
    "t5-base FFN wi 768->3072": (768, 3072),
}
SPARSITIES = [0.5, 0.8, 0.9, 0.95]
PROVIDERS = ["dense", "torch_sparse", "cpp"]


def limit(tokens, sparsity):
    density = 1 - sparsity
    return ("bytes", 4 / (6 * density)) if tokens <= 32 else ("FLOPs", 1 / density)


def setup_csr_linear(provider, in_features, out_features, sparsity, backward, tokens):
    """One factory per op: returns a zero-argument callable running the op for `provider`."""
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(out_features, in_features, generator=g) >= sparsity
    weight = torch.randn(out_features, in_features, generator=g) * mask
    x = torch.randn(tokens, in_features, generator=g, requires_grad=backward)
    dy = torch.randn(tokens, out_features, generator=g)
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


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_csr_linear(record_interleaved, record_limit, pass_, tokens, shape, sparsity):
    # The providers alternate call by call (conftest.record_interleaved), as a model's layers cycle
    # through the cache. Timed one after another, each provider's weight stayed cache-resident
    # through its own rounds: at 1 token (t5-base wi, s=0.5) ours measured 0.55x dense's speed that
    # way and 1.44x interleaved, on the same AMD EPYC host.
    in_features, out_features = SHAPES[shape]
    fns = {p: setup_csr_linear(p, in_features, out_features, sparsity, pass_ == "fwd+bwd", tokens) for p in PROVIDERS}
    group = f"csr_linear {pass_} {tokens} tok {shape} s={sparsity}"
    record_interleaved(group, fns, rounds=15 if tokens <= 32 else 7)
    record_limit(group, *limit(tokens, sparsity))
