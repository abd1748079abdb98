"""Speed of the 2:4 sparse linear against dense F.linear and our CSR at sparsity 0.5 (the same
density), on T5 shapes, fp32, 512 tokens.

    pytest benches/test_bench_semi24_linear.py

Two kinds of group: pytest-benchmark rounds per provider ("fwd", "fwd+bwd"), and the three
providers timed call by call in alternation ("... interleaved"), which is the figure to quote on a
shared machine whose speed drifts (bench_utils.time_interleaved).
"""
import pytest
import torch
import torch.nn.functional as F

from bench_utils import make_runner

from sparse_t5 import SparseLinear

TOKENS = 512
SHAPES = {
    "t5-small FFN wi 512->2048": (512, 2048),
    "t5-small FFN wo 2048->512": (2048, 512),
    "t5-base FFN wi 768->3072": (768, 3072),
}
PROVIDERS = ["dense", "cpp_csr", "cpp_2:4"]


def setup_semi24_linear(provider, in_features, out_features, backward, tokens=TOKENS):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    layer24 = SparseLinear.from_dense(weight, format="2:4")
    masked = layer24.to_dense()  # all providers compute with the same 2:4-masked weight
    x = torch.randn(tokens, in_features, generator=g, requires_grad=backward)
    dy = torch.randn(tokens, out_features, generator=g)
    if provider == "dense":
        w = masked.clone().requires_grad_(backward)
        fwd = lambda: F.linear(x, w)  # noqa: E731
    elif provider == "cpp_csr":
        layer = SparseLinear.from_dense(masked, masked != 0, format="csr")
        fwd = lambda: layer(x)  # noqa: E731
    elif provider == "cpp_2:4":
        fwd = lambda: layer24(x)  # noqa: E731
    else:
        raise ValueError(provider)
    return make_runner(fwd, dy, backward)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_semi24_linear(record, pass_, shape, provider):
    in_features, out_features = SHAPES[shape]
    fn = setup_semi24_linear(provider, in_features, out_features, backward=pass_ == "fwd+bwd")
    record(f"semi24_linear {pass_} {shape}", provider, fn)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_semi24_linear_interleaved(record_interleaved, pass_, shape):
    in_features, out_features = SHAPES[shape]
    fns = {p: setup_semi24_linear(p, in_features, out_features, backward=pass_ == "fwd+bwd") for p in PROVIDERS}
    record_interleaved(f"semi24_linear {pass_} interleaved {shape}", fns, rounds=30 if pass_ == "fwd" else 15)


@pytest.mark.parametrize("tokens", [1, 8])
def test_semi24_linear_decoding_step_interleaved(record_interleaved, tokens):
    """A generation step: a few tokens (the few-token path of the 2:4 forward), t5-small FFN wi."""
    in_features, out_features = SHAPES["t5-small FFN wi 512->2048"]
    fns = {p: setup_semi24_linear(p, in_features, out_features, backward=False, tokens=tokens) for p in PROVIDERS}
    record_interleaved(f"semi24_linear fwd interleaved {tokens} token(s) t5-small FFN wi 512->2048", fns, rounds=200)
