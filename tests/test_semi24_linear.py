"""2:4 semi-structured sparse linear: format, ops, layer and model against the dense masked reference.

Kernel: csrc/cpu/semi24_kernels_impl.h. Binding: csrc/semi24_linear.cpp. Python: sparse_t5/ops/semi24_linear.py.
"""

import pytest
import torch
from conftest import skip_dtype_under_triton_interpreter
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from sparse_t5 import Semi24Linear, Semi24Weight, SparseLinear, SparseT5ForConditionalGeneration
from sparse_t5.formats import semi24_magnitude_mask

# Every test here runs under each exact method of the ops (conftest.py kernel_method).
pytestmark = pytest.mark.usefixtures("kernel_method")

RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}
SHAPES = [
    ((5,), 124, 77),      # awkward: one token tile, odd number of groups (124 / 4 = 31)
    ((3, 7), 64, 40),     # 3-D input
    ((2, 70), 96, 33),    # several tiles (32-token ones: 64-token tiles would pad 192 slots for 140), partial
                          # last tile, out not a multiple of the row block
    ((1,), 512, 48),      # one token
    ((40,), 4, 9),        # a single group
    ((300,), 1028, 20),   # several L1 chunks, 257 groups, 128-token dvalues tiles with a partial last one
]


def assert_close_rel(actual, expected, dtype, what):
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape, what
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.to(torch.float64) - expected).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max error {err:.3e} > {RTOL[dtype]:.0e} x {scale:.3e}"


@pytest.mark.parametrize("lead,in_features,out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_masked_reference(lead, in_features, out_features, dtype, bias):
    skip_dtype_under_triton_interpreter(dtype)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    layer = SparseLinear.from_dense(weight, bias=b, format="2:4")
    assert isinstance(layer, Semi24Linear)
    mask = semi24_magnitude_mask(weight)
    assert torch.equal(layer.mask(), mask)
    x = torch.randn(*lead, in_features, generator=g).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    w_ref = (weight * mask).double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    b_ref = b.double().requires_grad_() if bias else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy.double())
    assert_close_rel(y.detach(), y_ref, dtype, "forward")
    assert_close_rel(x.grad, x_ref.grad, dtype, "grad x")
    assert_close_rel(layer.values.grad.flatten(), w_ref.grad[mask], dtype, "grad values")
    if bias:
        assert_close_rel(layer.bias.grad, b_ref.grad, dtype, "grad bias")


def test_cpp_op_rejects_bad_shapes_and_dtypes():
    s = Semi24Weight.from_dense(torch.randn(4, 16))
    ops = torch.ops.sparse_t5
    with pytest.raises(ValueError, match="features in its last dimension"):
        ops.semi24_linear(torch.randn(2, 12), s.values, s.meta)
    with pytest.raises(TypeError, match="meta must be uint8"):
        ops.semi24_linear(torch.randn(2, 16), s.values, s.meta.to(torch.int16))
    with pytest.raises(ValueError, match="meta must have shape"):
        ops.semi24_linear(torch.randn(2, 16), s.values, s.meta[:, :1])
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.semi24_linear(torch.randn(2, 14), torch.randn(4, 7), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(TypeError, match="does not match values dtype"):
        ops.semi24_linear(torch.randn(2, 16).double(), s.values, s.meta)
    with pytest.raises(ValueError, match="same leading dimensions"):
        ops.semi24_sddmm(torch.randn(3, 4), torch.randn(2, 16), s.meta)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(2)
    s = Semi24Weight.from_dense(torch.randn(5, 12, generator=g, dtype=torch.float64))
    x = torch.randn(2, 3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    v = s.values.clone().requires_grad_()
    b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: torch.ops.sparse_t5.semi24_linear(x, v, s.meta, b), (x, v, b))


def test_opcheck_every_op():
    g = torch.Generator().manual_seed(3)
    s = Semi24Weight.from_dense(torch.randn(24, 40, generator=g))
    x = torch.randn(3, 5, 40, generator=g)
    dy = torch.randn(3, 5, 24, generator=g)
    v = s.values.clone().requires_grad_()
    b = torch.randn(24, generator=g, requires_grad=True)
    ops = torch.ops.sparse_t5
    torch.library.opcheck(ops.semi24_linear.default, (x.clone().requires_grad_(), v, s.meta, b))
    torch.library.opcheck(ops.semi24_linear.default, (x, s.values, s.meta, None))
    torch.library.opcheck(ops.semi24_linear_backward_input.default, (dy, s.values, s.meta))
    torch.library.opcheck(ops.semi24_sddmm.default, (dy, x, s.meta))


# ---- the T5 model at 2:4 -----------------------------------------------------------------------------
def tiny_pair(tmp_path):
    torch.manual_seed(0)
    config = T5Config(vocab_size=101, d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=2, dropout_rate=0.0,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf = T5ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "hf")


def test_t5_parity_at_two_four_against_masked_hf(tmp_path):
    hf, ours = tiny_pair(tmp_path)
    ours.sparsify(format="2:4")
    layers = ours.sparse_layers()
    assert layers and all(m.format == "2:4" and m.sparsity == 0.5 for m in layers.values())
    with torch.no_grad():
        for name, layer in layers.items():
            hf.get_submodule(name).weight.copy_(layer.to_dense())
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(2, 101, (3, 9), generator=g), torch.randint(2, 101, (3, 5), generator=g)
    a = hf(input_ids=ids, labels=labels, use_cache=False)
    b = ours(input_ids=ids, labels=labels)
    assert_close_rel(b.logits, a.logits, torch.float32, "logits")
    a.loss.backward()
    b.loss.backward()
    for name, layer in layers.items():
        assert_close_rel(layer.values.grad.flatten(), hf.get_submodule(name).weight.grad[layer.mask()],
                         torch.float32, name)
    kw = dict(max_new_tokens=6, suppress_tokens=[0, 1], num_beams=4)
    assert torch.equal(ours.generate(input_ids=ids, **kw), hf.generate(input_ids=ids, **kw))


def test_t5_two_four_checkpoint_round_trip(tmp_path):
    _, ours = tiny_pair(tmp_path)
    ours.sparsify(format="2:4")
    ours.save_pretrained(tmp_path / "s24")
    loaded = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "s24")
    for k, v in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert all(m.format == "2:4" for m in loaded.sparse_layers().values())


def test_sparsify_two_four_rejects_other_sparsities(tmp_path):
    _, ours = tiny_pair(tmp_path)
    with pytest.raises(ValueError, match="0.5 by construction"):
        ours.sparsify(0.7, format="2:4")
    ours.sparsify(0.5, format="csr")
    with pytest.raises(ValueError, match="already sparse in format 'csr'"):
        ours.sparsify(format="2:4")


_VARIANT_CHECK = """
import torch, torch.nn.functional as F
from sparse_t5 import SparseLinear, cpu_isa
assert cpu_isa() == "{isa}"
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for T, i, o in ((5, 124, 77), (130, 64, 40), (40, 32, 33)):
        w = torch.randn(o, i, generator=g).to(dtype)
        layer = SparseLinear.from_dense(w, format="2:4")
        x = torch.randn(T, i, generator=g).to(dtype)
        ref = F.linear(x.double(), layer.to_dense().double())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert (layer(x).double() - ref).abs().max() <= tol * ref.abs().max(), (dtype, T)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_kernel_variant(isa):
    from test_csr_linear import check_kernel_variant

    check_kernel_variant(isa, _VARIANT_CHECK)
