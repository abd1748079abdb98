"""dense_linear_few_tokens (csrc/dense_few_tokens.cpp, csrc/cpu/dense_kernels_impl.h) and the model's
LMHead, which takes it at decoding steps.

The op against the fp64 dense product: 1-16 tokens (each a kernel of its own), rows whose length is
not a multiple of the 16-wide vector (the scalar tail), 1-D to 3-D and strided inputs, empty shapes,
fp32 and bf16, every compiled ISA variant; bad input raises naming the problem. LMHead: which calls
take the op (CPU, no gradient; fp32 at 2-16 tokens, bf16 at 1-4) and that the rest, training included, keeps
F.linear; the model's logits and beam search agree with F.linear's.
"""
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config

import sparse_t5.modeling_t5 as modeling
from sparse_t5 import SparseT5ForConditionalGeneration
from sparse_t5.ops import dense_linear_few_tokens
from sparse_t5.ops.dense_few_tokens import MAX_TOKENS
from test_csr_linear import assert_close_rel, check_kernel_variant

SHAPES = [(33, 37), (300, 768), (5, 1), (16, 16), (40, 15), (1, 50)]  # (out, in): tails, a 1-wide row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", range(1, 17))
def test_matches_the_dense_product(tokens, dtype):
    g = torch.Generator().manual_seed(tokens)
    for out_f, in_f in SHAPES:
        w = torch.randn(out_f, in_f, generator=g).to(dtype)
        x = torch.randn(tokens, in_f, generator=g).to(dtype)
        y = dense_linear_few_tokens(x, w)
        assert y.dtype == dtype
        assert_close_rel(y, F.linear(x.double(), w.double()), dtype, f"{out_f}x{in_f}, {tokens} tokens")


def test_leading_dims_strides_and_empty_shapes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 48, generator=g)
    x3 = torch.randn(2, 5, 48, generator=g)  # 10 tokens as [batch, length, features]
    assert_close_rel(dense_linear_few_tokens(x3, w), F.linear(x3.double(), w.double()), torch.float32, "3-D")
    x1 = torch.randn(48, generator=g)  # one token, 1-D
    assert_close_rel(dense_linear_few_tokens(x1, w), F.linear(x1.double(), w.double()), torch.float32, "1-D")
    xs = torch.randn(48, 6, generator=g).t()  # strided x and weight
    ws = torch.randn(48, 70, generator=g).t()
    assert_close_rel(dense_linear_few_tokens(xs, ws), F.linear(xs.double(), ws.double()), torch.float32, "strided")
    assert dense_linear_few_tokens(torch.randn(0, 48), w).shape == (0, 70)
    assert dense_linear_few_tokens(torch.randn(3, 48), torch.randn(0, 48)).shape == (3, 0)
    assert torch.equal(dense_linear_few_tokens(torch.randn(3, 0), torch.randn(5, 0)), torch.zeros(3, 5))


def test_bad_input_raises_naming_the_problem():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="at most 16 tokens, got 17"):
        dense_linear_few_tokens(torch.randn(17, 16), w)
    with pytest.raises(ValueError, match="x has 15 features in its last dimension but the weight's in_features is 16"):
        dense_linear_few_tokens(torch.randn(2, 15), w)
    with pytest.raises(TypeError, match="x dtype .*BFloat16 does not match values dtype .*Float"):
        dense_linear_few_tokens(torch.randn(2, 16, dtype=torch.bfloat16), w)
    with pytest.raises(TypeError, match="takes float32 or bfloat16, got .*Double"):
        dense_linear_few_tokens(torch.randn(2, 16, dtype=torch.float64), w.double())
    with pytest.raises(TypeError, match="weight must be float32, float64 or bfloat16, got .*Half"):
        dense_linear_few_tokens(torch.randn(2, 16).half(), w.half())
    with pytest.raises(ValueError, match="weight must be 2-D"):
        dense_linear_few_tokens(torch.randn(2, 16), torch.randn(16))


def test_fake_rule_gives_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = dense_linear_few_tokens(torch.empty(2, 5, 48), torch.empty(70, 48))
    assert y.shape == (2, 5, 70) and y.dtype == torch.float32


_VARIANT_CHECK = """
import torch, torch.nn.functional as F
from sparse_t5 import cpu_isa
from sparse_t5.ops import dense_linear_few_tokens
assert cpu_isa() == "{isa}", cpu_isa()
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    for T in (1, 7, 16):
        for o, i in ((33, 37), (20, 768)):
            w = torch.randn(o, i, generator=g).to(dtype); x = torch.randn(T, i, generator=g).to(dtype)
            ref = F.linear(x.double(), w.double())
            tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
            assert (dense_linear_few_tokens(x, w).double() - ref).abs().max() <= tol * ref.abs().max(), (dtype, T, o, i)
print("ok")
"""


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_kernel_variant(isa):
    check_kernel_variant(isa, _VARIANT_CHECK)


# ---- LMHead: which calls take the op ---------------------------------------------------------------
@pytest.fixture
def op_calls(monkeypatch):
    calls = []

    def counting(x, w):
        calls.append(x.shape)
        return dense_linear_few_tokens(x, w)

    monkeypatch.setattr(modeling, "dense_linear_few_tokens", counting)
    return calls


def test_lm_head_takes_the_op_for_decoding_steps_only(op_calls):
    torch.manual_seed(0)
    head = modeling.LMHead(48, 70, bias=False)
    assert isinstance(head, torch.nn.Linear)
    for tokens, grad, dtype, taken in ((10, False, torch.float32, True), (2, False, torch.float32, True),
                                       (16, False, torch.float32, True), (1, False, torch.float32, True),
                                       (17, False, torch.float32, False), (10, True, torch.float32, False),
                                       (1, False, torch.bfloat16, True), (4, False, torch.bfloat16, True),
                                       (5, False, torch.bfloat16, False), (10, False, torch.float64, False)):
        head = head.to(dtype)
        x = torch.randn(1, tokens, 48, dtype=dtype)
        before = len(op_calls)
        with torch.set_grad_enabled(grad):
            y = head(x)
        assert (len(op_calls) > before) == taken, (tokens, grad, dtype)
        assert_close_rel(y, F.linear(x.double(), head.weight.double()), dtype if dtype != torch.float64 else torch.float32,
                         f"{tokens} tokens, grad {grad}, {dtype}")
    head = head.float()
    x = torch.randn(1, 10, 48)
    with torch.no_grad():  # a frozen head under grad mode takes it too; an input that needs grad does not
        head.weight.requires_grad_(False)
    before = len(op_calls)
    head(x)
    head(x.requires_grad_())
    assert len(op_calls) == before + 1
    head.weight.requires_grad_(True)
    head.few_tokens = {}
    with torch.no_grad():
        head(torch.randn(1, 10, 48))
    assert len(op_calls) == before + 1, "few_tokens = {} turns the op off"


def test_lm_head_runs_more_tokens_over_slices_of_the_weight(op_calls, monkeypatch):
    """Above the op's range, fp32 inference runs F.linear over vocab_chunk rows at a time (the last
    slice ragged) and concatenates: the same logits as one F.linear. Training, bf16 and calls above
    the range take one F.linear."""
    linear_rows = []

    def counting_linear(x, w, bias=None):
        linear_rows.append(w.shape[0])
        return F.linear(x, w, bias)

    monkeypatch.setattr(modeling, "F", types.SimpleNamespace(linear=counting_linear))
    torch.manual_seed(0)
    head = modeling.LMHead(48, 70, bias=False)
    head.vocab_chunk = 16
    lo, hi = head.chunked_tokens[torch.float32]
    assert lo == MAX_TOKENS + 1
    for tokens, grad, dtype, sliced in ((lo, False, torch.float32, True), (hi, False, torch.float32, True),
                                        (40, False, torch.float32, True), (hi + 1, False, torch.float32, False),
                                        (40, True, torch.float32, False), (40, False, torch.bfloat16, False)):
        head = head.to(dtype)
        x = torch.randn(2, tokens // 2, 48, dtype=dtype) if tokens % 2 == 0 else torch.randn(tokens, 48, dtype=dtype)
        linear_rows.clear()
        with torch.set_grad_enabled(grad):
            y = head(x)
        assert linear_rows == ([16, 16, 16, 16, 6] if sliced else [70]), (tokens, grad, dtype)
        assert y.shape == (*x.shape[:-1], 70) and y.is_contiguous()
        assert_close_rel(y, F.linear(x.double(), head.weight.double()), dtype, f"{tokens} tokens, grad {grad}, {dtype}")
    assert not op_calls
    head = head.float()
    head.vocab_chunk = 70  # a weight of one slice or less: one F.linear
    linear_rows.clear()
    with torch.no_grad():
        head(torch.randn(40, 48))
    assert linear_rows == [70]
    head.vocab_chunk, head.chunked_tokens = 16, {}
    linear_rows.clear()
    with torch.no_grad():
        head(torch.randn(40, 48))
    assert linear_rows == [70], "chunked_tokens = {} turns the slices off"


def test_lm_head_trains_through_f_linear(op_calls):
    torch.manual_seed(0)
    head = modeling.LMHead(48, 70, bias=False)
    x = torch.randn(10, 48)
    head(x).square().sum().backward()
    assert not op_calls and head.weight.grad is not None
    assert torch.allclose(head.weight.grad, 2 * F.linear(x, head.weight).t() @ x, rtol=1e-4, atol=1e-4)


def test_the_model_with_the_op_agrees_with_f_linear(op_calls):
    """A 10-token decoder forward (the lm_head at beam 10) and a 4-beam search, with the op and with
    F.linear: logits to fp32 rounding, the same beams."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=300, d_model=48, d_kv=8, num_heads=6, d_ff=96, num_layers=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=4.0)
    model = SparseT5ForConditionalGeneration(config).eval()
    model.sparsify(0.6)
    assert type(model.lm_head) is modeling.LMHead
    ids = torch.randint(2, 300, (2, 9))
    dec = torch.randint(2, 300, (2, 5))
    kw = dict(max_new_tokens=6, num_beams=4, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=dec).logits
        beams = model.generate(input_ids=ids, **kw)
        assert len(op_calls) >= 2
        model.lm_head.few_tokens = {}
        ref_logits = model(input_ids=ids, decoder_input_ids=dec).logits
        ref_beams = model.generate(input_ids=ids, **kw)
    assert_close_rel(logits, ref_logits, torch.float32, "logits")
    assert torch.equal(beams.sequences, ref_beams.sequences)
    assert torch.allclose(beams.sequences_scores, ref_beams.sequences_scores, rtol=1e-5, atol=1e-5)
    # 24 decoder tokens take the slices (64 rows, the last 44): the same logits as one F.linear
    dec = torch.randint(2, 300, (2, 12))
    with torch.no_grad():
        model.lm_head.vocab_chunk = 64
        sliced = model(input_ids=ids, decoder_input_ids=dec).logits
        model.lm_head.chunked_tokens = {}
        ref = model(input_ids=ids, decoder_input_ids=dec).logits
    assert_close_rel(sliced, ref, torch.float32, "logits over slices")
