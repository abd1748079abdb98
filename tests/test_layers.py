"""The sparse layers (sparse_t5/layers.py: SparseLinear, CSRLinear, Semi24Linear): parameters,
optimizer state, memory and state dicts. Their ops against the dense reference:
tests/test_csr_linear.py and tests/test_semi24_linear.py.
"""
import pytest
import torch

from sparse_t5 import SparseLinear

# Every test here runs under each exact method of the ops (conftest.py kernel_method), MKL's CSR
# forward included (a 2:4 call under "mkl" runs sparse).
pytestmark = pytest.mark.usefixtures("kernel_method")
KERNEL_METHODS = ("sparse", "dense", "mkl")


# ---- CSR -------------------------------------------------------------------------------------------
def test_adamw_keeps_pattern_and_zeros():
    g = torch.Generator().manual_seed(8)
    weight, mask = torch.randn(32, 48, generator=g), torch.rand(32, 48, generator=g) > 0.7
    layer = SparseLinear.from_dense(weight, mask, bias=torch.zeros(32))
    params = dict(layer.named_parameters())
    assert set(params) == {"values", "bias"}
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.9, 0.98))
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(16, 48, generator=g)).pow(2).mean().backward()
        opt.step()
    dense = layer.to_dense()
    assert torch.equal(layer.mask(), mask)
    assert torch.all(dense[~mask] == 0)
    assert not torch.equal(dense[mask], weight[mask])  # the kept weights did train
    state = opt.state[layer.values]
    assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == int(mask.sum())


def test_properties_and_memory():
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(64, 128, generator=g) > 0.75
    layer = SparseLinear.from_dense(torch.randn(64, 128, generator=g), mask, bias=torch.zeros(64))
    nnz = int(mask.sum())
    assert layer.nnz == nnz
    assert layer.sparsity == pytest.approx(1 - nnz / (64 * 128))
    # fp32 values + int16 columns + int32 row pointers + fp32 bias
    assert layer.memory_bytes() == 4 * nnz + 2 * nnz + 4 * 65 + 4 * 64
    assert (layer.col_idx.element_size()) <= 2  # <= 2.5 bytes of index per nonzero
    assert not any(p.shape == (64, 128) for p in layer.parameters())
    assert not any(b.shape == (64, 128) for b in layer.buffers())
    torch.testing.assert_close(layer.to_linear().weight, layer.to_dense())


def test_state_dict_round_trip_exact():
    g = torch.Generator().manual_seed(10)
    a = SparseLinear.from_dense(torch.randn(20, 30, generator=g), torch.rand(20, 30, generator=g) > 0.5,
                                bias=torch.randn(20, generator=g))
    sd = a.state_dict()
    assert set(sd) == {"values", "row_ptr", "col_idx", "bias"}
    b = SparseLinear.empty(30, 20, nnz=3, bias=True)  # different nnz: adopts the checkpoint's structure
    b.load_state_dict(sd)
    for k, v in b.state_dict().items():
        assert torch.equal(v, sd[k]) and v.dtype == sd[k].dtype, k
    x = torch.randn(5, 30, generator=g)
    assert torch.equal(a(x), b(x))


def test_load_state_dict_rejects_corrupt_structure():
    a = SparseLinear.from_dense(torch.randn(4, 6), torch.rand(4, 6) > 0.3)
    sd = a.state_dict()
    sd["col_idx"] = sd["col_idx"].clone()
    sd["col_idx"][0] = 99
    with pytest.raises(ValueError, match="corrupt sparse weight.*outside"):
        SparseLinear.empty(6, 4, nnz=1, bias=False).load_state_dict(sd)


# ---- 2:4 -------------------------------------------------------------------------------------------
def test_pattern_stays_two_of_four_after_adamw():
    g = torch.Generator().manual_seed(4)
    layer = SparseLinear.from_dense(torch.randn(32, 64, generator=g), format="2:4")
    mask, meta = layer.mask(), layer.meta.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, betas=(0.9, 0.98))
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(16, 64, generator=g)).pow(2).mean().backward()
        opt.step()
    assert torch.equal(layer.meta, meta) and torch.equal(layer.mask(), mask)
    dense = layer.to_dense()
    assert torch.all(dense[~mask] == 0)
    assert torch.all((dense != 0).reshape(32, 16, 4).sum(-1) <= 2)
    assert set(dict(layer.named_parameters())) == {"values"}
    assert opt.state[layer.values]["exp_avg"].shape == (32, 32)


def test_memory_bytes_per_original_weight():
    layer = SparseLinear.from_dense(torch.randn(3072, 768), format="2:4")  # t5-base FFN wi, no bias
    per_weight = layer.memory_bytes() / (3072 * 768)
    assert per_weight == pytest.approx(2.0 + 0.125)  # fp32 values for half + 1 byte of meta per 8 inputs
    assert per_weight <= 2.25


def test_state_dict_round_trip_and_empty_placeholder():
    a = SparseLinear.from_dense(torch.randn(8, 24), bias=torch.randn(8), format="2:4")
    b = SparseLinear.empty(24, 8, bias=True, format="2:4")
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 24)
    assert torch.equal(a(x), b(x))
    sd = a.state_dict()
    sd["meta"] = sd["meta"].clone().fill_(0x11)
    with pytest.raises(ValueError, match="corrupt sparse weight"):
        b.load_state_dict(sd)
