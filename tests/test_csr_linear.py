"""CSR sparse linear: ops and SparseLinear against the dense masked reference.

Kernel: csrc/cpu/csr_kernels_impl.h. Binding: csrc/csr_linear.cpp. Python: sparse_t5/ops/csr_linear.py.
"""
import os
import subprocess
import sys

import pytest
import torch
from conftest import skip_dtype_under_triton_interpreter
import torch.nn.functional as F

from sparse_t5 import CSRWeight, SparseLinear
from test_formats import valid_triple
from sparse_t5.ops import cpu_isa, csr_linear

# Every test here runs under each exact method of the ops (conftest.py kernel_method), MKL's CSR
# forward and the narrow tile included (a call of another op under either runs sparse).
pytestmark = pytest.mark.usefixtures("kernel_method")
KERNEL_METHODS = ("sparse", "dense", "mkl", "sparse_narrow")

# Relative tolerance per dtype, against a reference computed in fp64 from the same (rounded) inputs.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}

SPARSITIES = [0.0, 0.2, 0.5, 0.9, 0.99, 1.0]
# (leading shape of x, in_features, out_features)
SHAPES = [
    ((5,), 123, 77),        # awkward sizes, fewer tokens than one tile
    ((3, 7), 123, 77),      # 3-D input
    ((2, 100), 64, 96),     # several token tiles, the last one partial
    ((40,), 1, 33),         # a single input column
    ((40,), 50, 1),         # a single output row
    ((1,), 512, 48),        # one token (generation)
    ((70,), 600, 24),       # rows past 256 nonzeros: 64-token tiles (else 32), the last partial
]


def random_mask(out_features, in_features, sparsity, generator):
    if sparsity == 0.0:
        return torch.ones(out_features, in_features, dtype=torch.bool)
    return torch.rand(out_features, in_features, generator=generator) >= sparsity


def assert_close_rel(actual, expected, dtype, what):
    expected = expected.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual.to(torch.float64) - expected).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max error {err:.3e} > {RTOL[dtype]:.0e} x {scale:.3e}"


def check_against_dense(lead, in_features, out_features, sparsity, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    mask = random_mask(out_features, in_features, sparsity, g)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    layer = SparseLinear.from_dense(weight, mask, bias=b)
    x = torch.randn(*lead, in_features, generator=g).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)

    # Reference: dense masked weight, autograd, in fp64 on the same rounded inputs.
    w_ref = (weight * mask).to(torch.float64).requires_grad_()
    x_ref = x.detach().to(torch.float64).requires_grad_()
    b_ref = b.to(torch.float64).requires_grad_() if bias else None
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy.to(torch.float64))

    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close_rel(y.detach(), y_ref, dtype, "forward")
    assert_close_rel(x.grad, x_ref.grad, dtype, "grad x")
    assert_close_rel(layer.values.grad, w_ref.grad[mask], dtype, "grad values")
    if bias:
        assert_close_rel(layer.bias.grad, b_ref.grad, dtype, "grad bias")
    return layer


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("lead,in_features,out_features", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_dense_masked_reference(lead, in_features, out_features, sparsity, dtype):
    skip_dtype_under_triton_interpreter(dtype)
    layer = check_against_dense(lead, in_features, out_features, sparsity, dtype)
    expected_nnz = round((1 - sparsity) * in_features * out_features) if sparsity in (0.0, 1.0) else None
    if expected_nnz is not None:
        assert layer.nnz == expected_nnz


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_without_bias(dtype):
    skip_dtype_under_triton_interpreter(dtype)
    check_against_dense((4, 9), 40, 24, 0.5, dtype, bias=False)
    # and through the raw op called without its optional argument
    g = torch.Generator().manual_seed(11)
    w = CSRWeight.from_dense(torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g) > 0.5)
    v = w.values.clone().requires_grad_()
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    torch.ops.sparse_t5.csr_linear(x, v, w.row_ptr, w.col_idx, 6, 5).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 6) @ w.to_dense())
    assert v.grad.shape == v.shape


def test_empty_rows_and_no_bias():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(64, 80, generator=g) > 0.5
    mask[::3] = False  # every third row empty
    weight = torch.randn(64, 80, generator=g)
    layer = SparseLinear.from_dense(weight, mask)
    x = torch.randn(70, 80, generator=g, requires_grad=True)
    y = layer(x)
    ref = F.linear(x, weight * mask)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(y[:, ::3] == 0)


def test_int32_column_index_path():
    check_against_dense((9,), 70, 20, 0.5, torch.float32)  # int16 default
    g = torch.Generator().manual_seed(2)
    weight, mask = torch.randn(20, 70, generator=g), torch.rand(20, 70, generator=g) > 0.5
    layer = SparseLinear.from_dense(weight, mask, index_dtype=torch.int32)
    assert layer.col_idx.dtype == torch.int32
    x = torch.randn(9, 70, generator=g)
    torch.testing.assert_close(layer(x), F.linear(x, weight * mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_features,index_dtype", [
    (40000, torch.uint16),  # beyond int16's 32768 columns
    (65536, torch.uint16),  # t5-11b's wo: the widest a 2-byte index addresses
    (65537, torch.int32),
])
def test_wide_layers_index_columns_past_int16(in_features, index_dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(3, in_features, generator=g)
    mask = torch.rand(3, in_features, generator=g) > 0.99
    mask[:, -1] = True  # the last column: 65535 must not read as -1
    layer = SparseLinear.from_dense(weight, mask)
    assert layer.col_idx.dtype == index_dtype
    for tokens in (1, 4, 40):  # the few-token path and the tiled kernels
        x = torch.randn(tokens, in_features, generator=g, requires_grad=True)
        y = layer(x)
        ref_w = (weight * mask).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y_ref = F.linear(x_ref, ref_w)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(layer.values.grad, ref_w.grad[mask], rtol=1e-5, atol=1e-4)
        layer.values.grad = None


def test_non_contiguous_inputs_are_handled():
    g = torch.Generator().manual_seed(4)
    weight, mask = torch.randn(30, 40, generator=g), torch.rand(30, 40, generator=g) > 0.5
    layer = SparseLinear.from_dense(weight, mask)
    x = torch.randn(40, 25, generator=g).t()  # [25, 40], transposed view
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), F.linear(x, weight * mask), rtol=1e-5, atol=1e-5)
    dy = torch.randn(30, 25, generator=g).t()
    dx = torch.ops.sparse_t5.csr_linear_backward_input(dy, layer.values, layer.row_ptr, layer.col_idx, 30, 40)
    torch.testing.assert_close(dx, dy @ (weight * mask), rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(7, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(7, 11, generator=g) > 0.4
    w = CSRWeight.from_dense(weight, mask)
    x = torch.randn(2, 3, 11, generator=g, dtype=torch.float64, requires_grad=True)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, v, b: csr_linear(x, v, w.row_ptr, w.col_idx, 7, 11, b), (x, values, bias)
    )


def test_opcheck_every_op():
    g = torch.Generator().manual_seed(6)
    weight, mask = torch.randn(24, 40, generator=g), torch.rand(24, 40, generator=g) > 0.5
    w = CSRWeight.from_dense(weight, mask)
    x = torch.randn(3, 5, 40, generator=g)
    dy = torch.randn(3, 5, 24, generator=g)
    values = w.values.clone().requires_grad_()
    bias = torch.randn(24, generator=g, requires_grad=True)
    ops = torch.ops.sparse_t5
    torch.library.opcheck(ops.csr_linear.default, (x.requires_grad_(), values, w.row_ptr, w.col_idx, 24, 40, bias))
    torch.library.opcheck(ops.csr_linear.default, (x.detach(), w.values, w.row_ptr, w.col_idx, 24, 40, None))
    torch.library.opcheck(ops.csr_linear_backward_input.default, (dy, w.values, w.row_ptr, w.col_idx, 24, 40))
    torch.library.opcheck(ops.csr_sddmm.default, (dy, x.detach(), w.row_ptr, w.col_idx, 24, 40))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(7)
    layer = SparseLinear.from_dense(torch.randn(16, 32, generator=g), torch.rand(16, 32, generator=g) > 0.5,
                                    bias=torch.randn(16, generator=g))

    def step(x):
        return torch.relu(layer(x)).sum()

    compiled = torch.compile(step, fullgraph=True)  # default backend: Inductor
    x = torch.randn(4, 32, generator=g)
    loss = compiled(x)
    loss.backward()
    grad_compiled = layer.values.grad.clone()
    layer.values.grad = None
    step(x).backward()
    torch.testing.assert_close(loss, step(x))
    torch.testing.assert_close(grad_compiled, layer.values.grad)


# ---- the C++ op rejects bad input instead of crashing -----------------------------------------------
@pytest.mark.parametrize("case,exc,message", [
    ("x_features", ValueError, "features in its last dimension"),
    ("x_dtype", TypeError, "does not match values dtype"),
    ("int_values", TypeError, "float32, float64 or bfloat16"),
    ("col_out_of_range", ValueError, "outside"),
    ("row_ptr_decreasing", ValueError, "decreases"),
    ("row_ptr_short", ValueError, "row_ptr must have shape"),
    ("row_ptr_last", ValueError, "must equal nnz"),
    ("col_len", ValueError, "col_idx must have shape"),
    ("bias_shape", ValueError, "bias must have shape"),
    ("int16_too_wide", ValueError, "int16 col_idx holds at most 32768"),
    ("uint16_too_wide", ValueError, "uint16 col_idx holds at most 65536"),
    ("int64_col_idx", TypeError, "col_idx must be uint16, int16 or int32"),
    ("int64_row_ptr", TypeError, "row_ptr must be int32"),
])
def test_cpp_op_checks(case, exc, message):
    values, row_ptr, col_idx, (out_f, in_f) = valid_triple()
    x = torch.randn(2, in_f)
    bias = None
    if case == "x_features":
        x = torch.randn(2, in_f + 1)
    elif case == "x_dtype":
        x = x.double()
    elif case == "int_values":
        values, x = values.to(torch.int32), x.to(torch.int32)
    elif case == "col_out_of_range":
        col_idx = col_idx.clone()
        col_idx[-1] = 1000
    elif case == "row_ptr_decreasing":
        row_ptr = torch.tensor([0, 3, 1, 6, 7], dtype=torch.int32)
    elif case == "row_ptr_short":
        row_ptr = row_ptr[:-1]
    elif case == "row_ptr_last":
        row_ptr = row_ptr.clone()
        row_ptr[-1] = 100
    elif case == "col_len":
        col_idx = col_idx[:-1]
    elif case == "bias_shape":
        bias = torch.zeros(out_f + 1)
    elif case == "int16_too_wide":
        in_f, x, col_idx = 40000, torch.randn(2, 40000), col_idx.to(torch.int16)
    elif case == "uint16_too_wide":
        in_f, x = 65537, torch.randn(2, 65537)
    elif case == "int64_col_idx":
        col_idx = col_idx.long()
    elif case == "int64_row_ptr":
        row_ptr = row_ptr.long()
    with pytest.raises(exc, match=message):
        torch.ops.sparse_t5.csr_linear(x, values, row_ptr, col_idx, out_f, in_f, bias)


def test_backward_ops_check_input():
    values, row_ptr, col_idx, (out_f, in_f) = valid_triple()
    with pytest.raises(ValueError, match="features in its last dimension"):
        torch.ops.sparse_t5.csr_linear_backward_input(torch.randn(2, out_f + 2), values, row_ptr, col_idx, out_f, in_f)
    with pytest.raises(ValueError, match="same leading dimensions"):
        torch.ops.sparse_t5.csr_sddmm(torch.randn(3, out_f), torch.randn(2, in_f), row_ptr, col_idx, out_f, in_f)
    bad = col_idx.clone()
    bad[0] = -5
    with pytest.raises(ValueError, match="outside"):
        torch.ops.sparse_t5.csr_sddmm(torch.randn(2, out_f), torch.randn(2, in_f), row_ptr, bad, out_f, in_f)


# ---- every compiled kernel variant -----------------------------------------------------------------
_VARIANT_CHECK = """
import torch, torch.nn.functional as F
from sparse_t5 import SparseLinear, cpu_isa
assert cpu_isa() == "{isa}", cpu_isa()
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for T, i, o in ((5, 123, 77), (130, 64, 40), (33, 16, 32), (70, 600, 24)):  # the last: 64-token tiles
        w = torch.randn(o, i, generator=g).to(dtype); m = torch.rand(o, i, generator=g) > 0.5
        layer = SparseLinear.from_dense(w, m, bias=torch.randn(o, generator=g).to(dtype))
        x = torch.randn(T, i, generator=g).to(dtype).requires_grad_()
        y = layer(x); y.sum().backward()
        ref = F.linear(x.detach().double(), (w * m).double(), layer.bias.detach().double())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), (dtype, T)
        gx = torch.ones(T, o, dtype=torch.float64) @ (w * m).double()
        assert (x.grad.double() - gx).abs().max() <= tol * gx.abs().max(), (dtype, T)
        gv = (torch.ones(T, o, dtype=torch.float64).t() @ x.detach().double())[m]
        assert (layer.values.grad.double() - gv).abs().max() <= tol * gv.abs().max(), (dtype, T)
from sparse_t5.kernel_policy import kernel_policy
with kernel_policy("sparse"):  # the tiled forward in panel chunks (test_forward_panel_chunks_match_dense)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = torch.randn(300, 600, generator=g).to(dtype); m = torch.rand(300, 600, generator=g) > 0.5
        x = torch.randn(45, 600, generator=g).to(dtype)  # 2 token tiles of 32: split (one is not)
        with torch.no_grad():
            y = SparseLinear.from_dense(w, m)(x)
        ref = F.linear(x.double(), (w * m).double())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), ("chunks", dtype)
torch.ops.sparse_t5.set_csr_dx_transpose_tokens(1)  # dx as the forward over a transient W^T
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for o, i in ((40, 90), (1200, 20)):  # W^T rows of ~12 nonzeros (32-token tiles) and ~360 (64)
        w = torch.randn(o, i, generator=g).to(dtype); m = torch.rand(o, i, generator=g) > 0.7
        layer = SparseLinear.from_dense(w, m)
        x = torch.randn(70, i, generator=g).to(dtype).requires_grad_()
        layer(x).sum().backward()
        gx = torch.ones(70, o, dtype=torch.float64) @ (w * m).double()
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        assert (x.grad.double() - gx).abs().max() <= tol * gx.abs().max(), ("dx transpose", dtype, o)
torch.ops.sparse_t5.set_csr_few_tokens(8)  # the few-token forward: its own code per variant
for kernel, dtype in [(k, d) for k in ("scalar", "gather") for d in (torch.float32, torch.bfloat16)]:
    torch.ops.sparse_t5.set_csr_few_tokens_kernel(kernel)  # gather: AVX-512's own, the scalar walk elsewhere
    for T in range(1, 9):
        w = torch.randn(70, 100, generator=g).to(dtype); m = torch.rand(70, 100, generator=g) > 0.6
        layer = SparseLinear.from_dense(w, m)
        x = torch.randn(T, 100, generator=g).to(dtype)
        ref = F.linear(x.double(), (w * m).double())
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        with torch.no_grad():
            assert (layer(x).double() - ref).abs().max() <= tol * ref.abs().max(), ("few", kernel, dtype, T)
print("ok")
"""


def _supported_isas():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["baseline"]
    if " avx2" in flags and " fma" in flags:
        isas.append("avx2")
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        isas.append("avx512")
    return isas


def check_kernel_variant(isa: str, script: str):
    """Run `script` (which prints "ok") in a process whose ops use the `isa` build of the kernels."""
    if isa not in _supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    out = subprocess.run([sys.executable, "-c", script.format(isa=isa)], env=dict(os.environ, SPARSE_T5_CPU_ISA=isa),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_kernel_variant(isa):
    check_kernel_variant(isa, _VARIANT_CHECK)


@pytest.fixture(params=["scalar", "gather"])
def few_token_path(request):
    """The CSR forward's few-token path for every call of 1-8 tokens, by each of its kernels, then
    the defaults."""
    ops = torch.ops.sparse_t5
    if request.param == "gather" and cpu_isa() != "avx512":
        pytest.skip(f"the gather few-token kernel is AVX-512's; this CPU runs {cpu_isa()} "
                    "(test_every_kernel_variant checks the scalar fallback)")
    before, kernel = ops.get_csr_few_tokens(), ops.get_csr_few_tokens_kernel()
    ops.set_csr_few_tokens(8)
    ops.set_csr_few_tokens_kernel(request.param)
    yield request.param
    ops.set_csr_few_tokens(before)
    ops.set_csr_few_tokens_kernel(kernel)


def _check_raw_forward(mask, tokens, dtype, index_dtype, g, what):
    """The raw op on a random weight at `mask` (CSR with `index_dtype` columns) and a bias, against
    F.linear in float64."""
    out_f, in_f = mask.shape
    w = (torch.randn(out_f, in_f, generator=g) * mask).to(dtype)
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype)
    y = torch.ops.sparse_t5.csr_linear(x, w[rows, cols].contiguous(), row_ptr, cols.to(index_dtype).contiguous(),
                                       out_f, in_f, b)
    assert_close_rel(y, F.linear(x.double(), w.double(), b.double()), dtype, what)


@pytest.mark.parametrize("index_dtype", [torch.uint16, torch.int16, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", range(1, 10))
def test_few_token_forward_matches_dense(few_token_path, tokens, dtype, index_dtype):
    """1-8 tokens take the few-token path (9 the tiled kernel), by either kernel: ragged rows (the
    scalar walk takes 8 nonzeros a step, then 4, then one at a time; the gather takes 32 then 16
    with a masked remainder), empty rows, a full row, an empty layer, uint16, int16 and int32 column indices."""
    g = torch.Generator().manual_seed(tokens)
    for out_f, in_f, density in ((77, 123, 0.5), (40, 700, 0.03), (33, 50, 1.0), (16, 40, 0.0), (9, 1, 0.7),
                                 (12, 1000, 0.2)):  # rows of ~200: several 32-wide steps, then a tail
        mask = torch.rand(out_f, in_f, generator=g) < density
        mask[min(3, out_f - 1)] = False  # an empty row
        _check_raw_forward(mask, tokens, dtype, index_dtype, g, f"{out_f}x{in_f} at {density}")


def test_few_token_setting_is_checked():
    ops = torch.ops.sparse_t5
    for bad in (-1, 9):
        with pytest.raises(ValueError, match="few-token path takes 0 to 8 tokens"):
            ops.set_csr_few_tokens(bad)
    assert 0 <= ops.get_csr_few_tokens() <= 8
    with pytest.raises(ValueError, match="few-token kernel must be 'scalar' or 'gather', got 'vector'"):
        ops.set_csr_few_tokens_kernel("vector")
    assert ops.get_csr_few_tokens_kernel() in ("scalar", "gather")


def test_default_variant_is_the_best_supported():
    assert cpu_isa() == _supported_isas()[-1] or "SPARSE_T5_CPU_ISA" in os.environ


@pytest.fixture(params=["scatter", "transpose"])
def dx_path(request):
    """The CSR dx = dy W by each of its two sparse paths, whatever the token count, then the default."""
    ops = torch.ops.sparse_t5
    before = ops.get_csr_dx_transpose_tokens()
    ops.set_csr_dx_transpose_tokens(0 if request.param == "scatter" else 1)
    yield request.param
    ops.set_csr_dx_transpose_tokens(before)


@pytest.mark.parametrize("index_dtype", [torch.uint16, torch.int16, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backward_input_paths_match_dense(dx_path, dtype, index_dtype):
    """Both dx paths (the scatter; the forward over a transient transpose) on ragged rows, an empty
    row, an empty column, a full row, an empty layer, 1 token, a partial tile and several tiles."""
    skip_dtype_under_triton_interpreter(dtype)
    ops = torch.ops.sparse_t5
    g = torch.Generator().manual_seed(5)
    for out_f, in_f, density in ((77, 123, 0.5), (40, 700, 0.03), (33, 50, 1.0), (16, 40, 0.0), (9, 1, 0.7)):
        mask = torch.rand(out_f, in_f, generator=g) < density
        mask[min(3, out_f - 1)] = False  # an empty row
        mask[:, min(2, in_f - 1)] = False  # an empty column (an empty row of the transpose)
        w = (torch.randn(out_f, in_f, generator=g) * mask).to(dtype)
        rows, cols = mask.nonzero(as_tuple=True)
        row_ptr = torch.zeros(out_f + 1, dtype=torch.int32)
        row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
        for tokens in (1, 70, 300):
            dy = torch.randn(tokens, out_f, generator=g).to(dtype)
            dx = ops.csr_linear_backward_input(dy, w[rows, cols].contiguous(), row_ptr,
                                               cols.to(index_dtype).contiguous(), out_f, in_f)
            assert_close_rel(dx, dy.double() @ w.double(), dtype, f"{dx_path} {out_f}x{in_f} at {density}, {tokens} tokens")


@pytest.mark.parametrize("index_dtype", [torch.uint16, torch.int16, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_forward_panel_chunks_match_dense(dtype, index_dtype, kernel_method):
    """Rows dense enough for the tiled forward to walk the panel in L1-sized chunks: a partial last
    chunk, partial row blocks and token tiles, an empty row, a row whose nonzeros all lie past the
    first chunk, a row with one nonzero in the last column, a full row, and a bias; then layers the
    rule does not split, as controls. csr_forward_tiling says which path each case takes; under
    "sparse_narrow" the rule's 4-vector tiles run as 2-vector tiles (the 1100-input cases), and so
    does every call whose 4-vector tiles would pad 10% more token slots (`padded`)."""
    skip_dtype_under_triton_interpreter(dtype)
    ops = torch.ops.sparse_t5
    g = torch.Generator().manual_seed(8)
    # (tokens, out, in, density, split): 2-vector tiles (256-column chunks), short rows (3 chunks) and
    # long rows (a 4-vector call narrowed to 2; 3 and 4 chunks, the last partial); then layers that
    # are not split: too sparse, a 1-vector tile (past the few-token path's 8 tokens in fp32/bf16;
    # one fp64 vector is 8 tokens), more than 1024 inputs (4-vector tiles), and one token tile.
    one_vector = 6 if dtype == torch.float64 else 12
    one_tile = 14 if dtype == torch.float64 else 30  # 2 vectors: 16 fp64 tokens, 32 fp32
    padded = 42 if dtype == torch.float64 else 90  # three 2-vector tiles, where two 4-vector ones pad a third
    narrow = kernel_method == "sparse_narrow"
    method = "sparse_narrow" if narrow else "sparse"
    for tokens, out_f, in_f, density, tile, split in (
            (45, 300, 600, 0.42, 2, True), (70, 50, 700, 0.9, 2, True), (40, 40, 1000, 0.45, 2, True),
            (45, 300, 600, 0.1, 2, False), (one_vector, 40, 1100, 0.5, 1, False),
            (64, 40, 1100, 0.5, 2, True) if narrow else (64, 40, 1100, 0.5, 4, False),
            (128, 40, 1100, 0.7, 2, True) if narrow else (128, 40, 1100, 0.7, 4, False),
            (padded, 40, 1100, 0.7, 2, True),
            (one_tile, 300, 600, 0.5, 2, False)):
        mask = torch.rand(out_f, in_f, generator=g) < density
        mask[3] = False  # an empty row
        mask[5, :520] = False  # nonzeros only past the first chunk (and past the second of 256)
        mask[6] = False
        mask[6, in_f - 1] = True  # one nonzero, in the last column
        mask[7] = True  # a full row
        vectors, chunks = ops.csr_forward_tiling(tokens, dtype, int(mask.sum()), out_f, in_f, method)
        assert (vectors, chunks > 1) == (tile, split), (tokens, out_f, in_f, density, vectors, chunks)
        _check_raw_forward(mask, tokens, dtype, index_dtype, g, f"{tokens} tokens, {out_f}x{in_f} at {density}")


def test_forward_tile_narrows_where_the_wide_one_pads():
    """Rows long enough for 4-vector tiles take 2 vectors wherever the wide tiles would compute at least
    10% more token slots, padding included, than the narrow ones; with no such padding they keep 4."""
    ops = torch.ops.sparse_t5
    nnz = 96 * 1536  # 96 x 3072 at density 0.5: 1536 nonzeros a row, past the rule's 256

    def vectors(tokens, dtype=torch.float32):
        return ops.csr_forward_tiling(tokens, dtype, nnz, 96, 3072, "sparse")[0]

    # fp32 and bf16 (16 lanes): wide tiles of 64 tokens, narrow ones of 32. Wide slots / narrow slots:
    # 1.0 at 33-64, 97-128, ...; 1.09 at 352, 1.08 at 416, 1.06 at 544 (kept wide); 1.33 at 65-96,
    # 1.2 at 160, 1.14 at 224, 1.11 at 288 (narrowed).
    for dtype in (torch.float32, torch.bfloat16):
        assert [vectors(t, dtype) for t in (40, 64, 100, 128, 192, 256, 352, 416, 544, 1024)] == [4] * 10
        assert [vectors(t, dtype) for t in (65, 96, 160, 224, 288)] == [2] * 5
    # fp64 (8 lanes): tiles of 32 and 16 tokens
    assert [vectors(t, torch.float64) for t in (20, 32, 64, 128)] == [4] * 4
    assert [vectors(t, torch.float64) for t in (33, 48, 80)] == [2] * 3


def test_forward_tiling_checks_its_arguments():
    ops = torch.ops.sparse_t5
    with pytest.raises(RuntimeError, match="must be positive"):
        ops.csr_forward_tiling(0, torch.float32, 10, 4, 4)
    with pytest.raises(TypeError, match="float32, float64 or bfloat16, got Half"):
        ops.csr_forward_tiling(8, torch.float16, 10, 4, 4)
    with pytest.raises(ValueError, match="method must be 'sparse' or 'sparse_narrow', got 'dense'"):
        ops.csr_forward_tiling(8, torch.float32, 10, 4, 4, "dense")


def test_backward_input_transpose_with_a_32bit_row_index(dx_path):
    """More than 65536 outputs: the transpose's row index is int32 (uint16 below that)."""
    g = torch.Generator().manual_seed(6)
    out_f, in_f = 65536 + 40, 3
    mask = torch.rand(out_f, in_f, generator=g) < 0.01
    mask[-1] = True  # the last row, past 65535
    w = torch.randn(out_f, in_f, generator=g) * mask
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    dy = torch.randn(5, out_f, generator=g)
    dx = torch.ops.sparse_t5.csr_linear_backward_input(dy, w[rows, cols].contiguous(), row_ptr,
                                                       cols.to(torch.int16).contiguous(), out_f, in_f)
    assert_close_rel(dx, dy.double() @ w.double(), torch.float32, dx_path)


def test_dx_transpose_setting_is_checked():
    with pytest.raises(ValueError, match="csr_dx_transpose_tokens must be >= 0"):
        torch.ops.sparse_t5.set_csr_dx_transpose_tokens(-1)
    assert torch.ops.sparse_t5.get_csr_dx_transpose_tokens() >= 0
