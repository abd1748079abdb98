"""Property-based fuzzing of the six CPU ops (issue 31): csr_linear, csr_linear_backward_input,
csr_sddmm, semi24_linear, semi24_linear_backward_input, semi24_sddmm, forward and backward.

- Well-formed inputs of random shapes (0 rows, 0 columns, 0 tokens, 1 token, ragged tiles, 1-D and
  3-D activations), int16 and int32 indices, fp32 / fp64 / bf16, under every kernel method and
  both few-token kernels of the CSR forward, each against the dense masked reference in fp64 (and
  the autograd path for fp32/fp64).
- Malformed inputs of every kind that reached the kernels before (row_ptr entries raised, columns
  reversed or swapped, duplicated) and of the kinds that already raised (out-of-range or negative
  columns, wrong dtypes, shapes, lengths, devices' layouts, mismatched activations). The oracle for
  a structure is the Python validator (sparse_t5.formats.validate_csr / validate_semi24): what it
  refuses, the op must refuse with a ValueError or TypeError from its own checks ("sparse_t5: ...");
  what it accepts (a mutation can land on another valid structure), the op must compute correctly.

Bounded here (make test: SPARSE_T5_FUZZ_EXAMPLES examples per test, derandomized so CI is
reproducible). scripts/fuzz_ops.sh runs it long, with several seeds, also against the ASan + UBSan
build of the ops, and prints the counts this module writes to SPARSE_T5_FUZZ_STATS.
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_t5 import cpu_isa, kernel_policy
from sparse_t5.formats import CSRWeight, Semi24Weight, validate_csr, validate_semi24
from sparse_t5.ops import csr_linear, semi24_linear

ops = torch.ops.sparse_t5

# Under the Triton interpreter entry point these CPU-op tests do not apply (no CUDA bodies run).
pytestmark = pytest.mark.skipif(os.environ.get("SPARSE_T5_TRITON_ON_CPU") == "1",
                                reason="CPU-op fuzzing; the Triton path has its own tests")

LONG = os.environ.get("SPARSE_T5_FUZZ_LONG") == "1"
settings.register_profile(
    "sparse_t5_fuzz",
    max_examples=int(os.environ.get("SPARSE_T5_FUZZ_EXAMPLES", "200")),
    deadline=None,
    database=None,
    derandomize=not LONG,  # the long run takes its seed from --hypothesis-seed
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile("sparse_t5_fuzz")

# Calls per op: well-formed, malformed that raised, malformed that was accepted (must stay 0).
COUNTS: dict = collections.defaultdict(collections.Counter)


def _write_stats():
    path = os.environ.get("SPARSE_T5_FUZZ_STATS")
    if path and COUNTS:
        with open(path, "w") as f:
            json.dump({op: dict(c) for op, c in COUNTS.items()}, f)


atexit.register(_write_stats)

RTOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
METHODS = ["auto", "sparse", "dense", "mkl", "sparse_narrow"]
# The CSR forward's few-token kernels (1-3 tokens by default): the scalar walk every ISA has, and
# AVX-512's gather kernel, which `sparse-t5 tune` picks where it is faster.
FEW_TOKEN_KERNELS = ["scalar", "gather"] if cpu_isa() == "avx512" else ["scalar"]


@contextlib.contextmanager
def few_token_kernel(kernel: str):
    previous = ops.get_csr_few_tokens_kernel()
    ops.set_csr_few_tokens_kernel(kernel)
    try:
        yield
    finally:
        ops.set_csr_few_tokens_kernel(previous)


def assert_close(actual, expected, dtype, what):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    expected = expected.to(torch.float64)
    scale = max(expected.abs().max().item(), 1.0)
    err = (actual.to(torch.float64) - expected).abs().max().item()
    assert err <= RTOL[dtype] * scale, f"{what}: max error {err:.3e} > {RTOL[dtype]:.0e} x {scale:.3e}"


def call(op: str, malformed: bool, fn):
    """Run one op call; a malformed call must raise our own clear error."""
    if not malformed:
        COUNTS[op]["well_formed"] += 1
        return fn()
    try:
        fn()
    except (ValueError, TypeError) as err:
        assert str(err).startswith("sparse_t5:"), f"{op}: not the op's own check: {err!r}"
        COUNTS[op]["malformed_raised"] += 1
        return None
    COUNTS[op]["malformed_accepted"] += 1
    raise AssertionError(f"{op} accepted a malformed input")


# ---- strategies ----------------------------------------------------------------------------------
@st.composite
def problem(draw, semi24: bool, wide: bool = False):
    out_f = draw(st.integers(0, 40))
    in_f = 4 * draw(st.integers(0, 18)) if semi24 else draw(st.integers(0, 70))
    lead = draw(st.sampled_from([(), (1,), (0,), "t", "bt"]))
    if lead == "t":
        lead = (draw(st.integers(0, 40)),)
    elif lead == "bt":
        lead = (draw(st.integers(1, 3)), draw(st.integers(0, 13)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    density = draw(st.sampled_from([0.0, 1.0, None]))
    if density is None:
        density = draw(st.floats(0.01, 0.99))
    if wide and draw(st.integers(0, 7)) == 0:
        # 1 in 8: wide, dense rows and at least two 32-token tiles, where the tiled CSR forward
        # walks its panel in chunks (kernel_api.h, csr_forward_chunk_columns); also dX over Wᵀ.
        # Well-formed input only: the malformed properties draw lists as long as nnz.
        in_f, lead, density = draw(st.integers(257, 1100)), (draw(st.integers(33, 80)),), draw(st.floats(0.4, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    dy = torch.randn(*lead, out_f, generator=g).to(dtype)
    bias = torch.randn(out_f, generator=g).to(dtype) if draw(st.booleans()) else None
    if semi24:
        s = Semi24Weight.from_dense(w)
        return s, x, dy, bias
    mask = torch.rand(out_f, in_f, generator=g) < density
    index_dtype = draw(st.sampled_from([torch.uint16, torch.int16, torch.int32]))
    return CSRWeight.from_dense(w, mask, index_dtype=index_dtype), x, dy, bias


# ---- CSR -----------------------------------------------------------------------------------------
def csr_dense(values, row_ptr, col_idx, shape):
    """The dense fp64 W of a structure that validate_csr accepted."""
    w = torch.zeros(shape, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(shape[0]), (row_ptr[1:] - row_ptr[:-1]).long())
    w[rows, col_idx.long()] = values.double()
    return w, rows


def run_csr(values, row_ptr, col_idx, shape, x, dy, bias, method, malformed: bool):
    out_f, in_f = shape
    dtype = values.dtype
    with kernel_policy(method), torch.no_grad():
        y = call("csr_linear", malformed, lambda: ops.csr_linear(x, values, row_ptr, col_idx, out_f, in_f, bias))
        dx = call("csr_linear_backward_input", malformed,
                  lambda: ops.csr_linear_backward_input(dy, values, row_ptr, col_idx, out_f, in_f))
        dv = call("csr_sddmm", malformed, lambda: ops.csr_sddmm(dy, x, row_ptr, col_idx, out_f, in_f))
    if malformed:
        return
    w, rows = csr_dense(values, row_ptr, col_idx, shape)
    x64, dy64 = x.double(), dy.double()
    y_ref = x64 @ w.t() + (bias.double() if bias is not None else 0)
    assert_close(y, y_ref, dtype, "csr_linear")
    assert_close(dx, dy64 @ w, dtype, "csr_linear_backward_input")
    tokens = math.prod(x.shape[:-1])
    grad_w = dy64.reshape(tokens, out_f).t() @ x64.reshape(tokens, in_f)
    assert_close(dv, grad_w[rows, col_idx.long()], dtype, "csr_sddmm")
    if dtype != torch.bfloat16:  # the autograd path (register_autograd) with the same reference
        xg, vg = x.clone().requires_grad_(), values.clone().requires_grad_()
        with kernel_policy(method):
            call("csr_linear", False, lambda: csr_linear(xg, vg, row_ptr, col_idx, out_f, in_f, bias).backward(dy))
        assert_close(xg.grad, dy64 @ w, dtype, "autograd dx")
        assert_close(vg.grad, grad_w[rows, col_idx.long()], dtype, "autograd dvalues")


@FUZZ
@given(p=problem(semi24=False, wide=True), method=st.sampled_from(METHODS), few=st.sampled_from(FEW_TOKEN_KERNELS))
def test_csr_ops_match_dense_on_well_formed_input(p, method, few):
    c, x, dy, bias = p
    with few_token_kernel(few):
        run_csr(c.values, c.row_ptr, c.col_idx, c.shape, x, dy, bias, method, malformed=False)


def mutate_csr_structure(data, c):
    """(kind, values, row_ptr, col_idx): one structural corruption of c."""
    values, rp, ci = c.values.clone(), c.row_ptr.clone(), c.col_idx.clone()
    # Edited in int32 and stored back in the index's own dtype (torch has no flip or negative fill in
    # uint16; a negative column stored in uint16 wraps to >= 65536 - 40, still outside the layer).
    index_dtype, ci = ci.dtype, ci.to(torch.int32)
    out_f, in_f = c.shape
    nnz = values.numel()
    kinds = ["row_ptr_first", "row_ptr_last", "row_ptr_random", "col_idx_random", "col_idx_int64", "row_ptr_int64"]
    if out_f >= 2:
        kinds.append("row_ptr_raised")  # the kind that corrupted the heap (issue 31)
    if nnz >= 2:
        kinds += ["columns_reversed", "columns_swapped", "column_duplicated"]
    if nnz >= 1:
        kinds += ["column_too_large", "column_negative"]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "row_ptr_raised":
        j = data.draw(st.integers(1, out_f - 1), label="row")
        rp[j] += data.draw(st.integers(1, 50), label="by")
    elif kind == "row_ptr_first":
        rp[0] = data.draw(st.integers(1, 50) | st.integers(-50, -1), label="first")
    elif kind == "row_ptr_last":
        rp[-1] = nnz + data.draw(st.integers(1, 50) | st.integers(-50, -1), label="delta")
    elif kind == "row_ptr_random":
        rp = torch.tensor(data.draw(st.lists(st.integers(-3, nnz + 3), min_size=out_f + 1, max_size=out_f + 1),
                                    label="row_ptr"), dtype=torch.int32)
    elif kind == "col_idx_random":
        ci = torch.tensor(data.draw(st.lists(st.integers(-3, in_f + 3), min_size=nnz, max_size=nnz),
                                    label="col_idx"), dtype=torch.int32)
    elif kind == "col_idx_int64":
        ci = ci.to(torch.int64)
    elif kind == "row_ptr_int64":
        rp = rp.to(torch.int64)
    elif kind == "columns_reversed":
        ci = ci.flip(0).contiguous()
    elif kind in ("columns_swapped", "column_duplicated"):
        k = data.draw(st.integers(1, nnz - 1), label="k")
        if kind == "columns_swapped":
            ci[k - 1], ci[k] = ci[k].clone(), ci[k - 1].clone()
        else:
            ci[k] = ci[k - 1]
    elif kind == "column_too_large":
        k = data.draw(st.integers(0, nnz - 1), label="k")
        ci[k] = min(in_f + data.draw(st.integers(0, 40), label="by"), torch.iinfo(index_dtype).max)
    elif kind == "column_negative":
        k = data.draw(st.integers(0, nnz - 1), label="k")
        ci[k] = -data.draw(st.integers(1, 40), label="by")
    if kind != "col_idx_int64":
        ci = ci.to(index_dtype)
    return kind, values, rp, ci


@FUZZ
@given(p=problem(semi24=False), method=st.sampled_from(METHODS), data=st.data())
def test_csr_ops_refuse_malformed_structure(p, method, data):
    c, x, dy, bias = p
    kind, values, rp, ci = mutate_csr_structure(data, c)
    try:
        validate_csr(values, rp, ci, c.shape)
        malformed = False  # the mutation landed on another valid structure: it must compute correctly
    except (ValueError, TypeError):
        malformed = True
    run_csr(values, rp, ci, c.shape, x, dy, bias, method, malformed)
    # A well-formed call after the malformed one: nothing was corrupted (ASan checks the rest).
    run_csr(c.values, c.row_ptr, c.col_idx, c.shape, x, dy, bias, method, malformed=False)


def bad_csr_arguments(data, c, x, dy, bias):
    """(kind, kwargs for run_csr) with a well-formed structure but a wrong argument."""
    out_f, in_f = c.shape
    a = dict(values=c.values, row_ptr=c.row_ptr, col_idx=c.col_idx, shape=c.shape, x=x, dy=dy, bias=bias)
    kinds = ["values_fp16", "values_int", "values_2d", "values_long", "x_features", "dy_features", "x_dtype",
             "out_features_negative", "index_on_meta"]
    if c.nnz >= 1:
        kinds.append("values_short")
    if c.nnz >= 2:  # a strided view of one element is still contiguous
        kinds.append("col_idx_strided")
    if out_f >= 1:
        kinds += ["bias_shape"]
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "values_fp16":
        a["values"] = c.values.half()
        a["x"], a["dy"] = x.half(), dy.half()
        a["bias"] = bias.half() if bias is not None else None
    elif kind == "values_int":
        a["values"] = c.values.to(torch.int32)
    elif kind == "values_2d":
        a["values"] = c.values.reshape(1, -1)
    elif kind == "values_long":
        a["values"] = torch.cat([c.values, c.values[:1].clone() if c.nnz else torch.ones(1, dtype=c.values.dtype)])
    elif kind == "values_short":
        a["values"] = c.values[:-1]
    elif kind == "x_features":
        a["x"] = torch.randn(*x.shape[:-1], in_f + 1).to(x.dtype)
        a["dy"] = torch.randn(*dy.shape[:-1], out_f + 1).to(dy.dtype)
    elif kind == "dy_features":
        a["dy"] = torch.randn(*dy.shape[:-1], out_f + 2).to(dy.dtype)
        a["x"] = torch.randn(*x.shape[:-1], in_f + 3).to(x.dtype)
    elif kind == "x_dtype":
        other = torch.float64 if x.dtype != torch.float64 else torch.float32
        a["x"], a["dy"] = x.to(other), dy.to(other)
    elif kind == "out_features_negative":
        a["shape"] = (-1, in_f)
    elif kind == "index_on_meta":
        a["col_idx"] = torch.empty_like(c.col_idx, device="meta")
    elif kind == "col_idx_strided":
        a["col_idx"] = torch.stack([c.col_idx, c.col_idx], 1)[:, 0]
    elif kind == "bias_shape":
        a["bias"] = torch.randn(out_f + 1).to(x.dtype)
    return kind, a


@FUZZ
@given(p=problem(semi24=False), method=st.sampled_from(METHODS), data=st.data())
def test_csr_ops_refuse_bad_arguments(p, method, data):
    c, x, dy, bias = p
    kind, a = bad_csr_arguments(data, c, x, dy, bias)
    out_f, in_f = a["shape"]
    with kernel_policy(method), torch.no_grad():
        if kind in ("bias_shape",):  # only the forward takes a bias
            call("csr_linear", True, lambda: ops.csr_linear(a["x"], a["values"], a["row_ptr"], a["col_idx"],
                                                            out_f, in_f, a["bias"]))
            return
        call("csr_linear", True, lambda: ops.csr_linear(a["x"], a["values"], a["row_ptr"], a["col_idx"],
                                                        out_f, in_f, a["bias"]))
        call("csr_linear_backward_input", True, lambda: ops.csr_linear_backward_input(
            a["dy"], a["values"], a["row_ptr"], a["col_idx"], out_f, in_f))
        if not kind.startswith("values_") and kind != "x_dtype":
            # csr_sddmm takes no values (so x and dy of another dtype than them are fine for it);
            # every other bad argument applies to it too
            call("csr_sddmm", True, lambda: ops.csr_sddmm(a["dy"], a["x"], a["row_ptr"], a["col_idx"], out_f, in_f))


def test_nan_inputs_are_data_not_errors():
    """NaN activations or weights are ordinary data: the ops return (NaN-carrying) results, no error
    and no crash."""
    c = CSRWeight.from_dense(torch.randn(6, 8), torch.rand(6, 8) < 0.5)
    x = torch.full((3, 8), float("nan"))
    assert torch.isnan(ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 6, 8, None)).any()
    s = Semi24Weight.from_dense(torch.randn(6, 8))
    assert torch.isnan(ops.semi24_linear(x, s.values.fill_(float("nan")), s.meta, None)).all()


# ---- 2:4 -----------------------------------------------------------------------------------------
def semi24_dense(values, meta, shape):
    w = torch.zeros(shape, dtype=torch.float64)
    s = Semi24Weight(values, meta, shape)
    return w.scatter_(1, s.positions(), values.double()), s.positions()


def run_semi24(values, meta, shape, x, dy, bias, method, malformed: bool):
    out_f, in_f = shape
    dtype = values.dtype
    with kernel_policy(method), torch.no_grad():
        y = call("semi24_linear", malformed, lambda: ops.semi24_linear(x, values, meta, bias))
        dx = call("semi24_linear_backward_input", malformed, lambda: ops.semi24_linear_backward_input(dy, values, meta))
        dv = call("semi24_sddmm", malformed, lambda: ops.semi24_sddmm(dy, x, meta))
    if malformed:
        return
    w, pos = semi24_dense(values, meta, shape)
    x64, dy64 = x.double(), dy.double()
    assert_close(y, x64 @ w.t() + (bias.double() if bias is not None else 0), dtype, "semi24_linear")
    assert_close(dx, dy64 @ w, dtype, "semi24_linear_backward_input")
    tokens = math.prod(x.shape[:-1])
    grad_w = dy64.reshape(tokens, out_f).t() @ x64.reshape(tokens, in_f)
    assert_close(dv, grad_w.gather(1, pos), dtype, "semi24_sddmm")
    if dtype != torch.bfloat16:
        xg, vg = x.clone().requires_grad_(), values.clone().requires_grad_()
        with kernel_policy(method):
            call("semi24_linear", False, lambda: semi24_linear(xg, vg, meta, bias).backward(dy))
        assert_close(xg.grad, dy64 @ w, dtype, "autograd dx")
        assert_close(vg.grad, grad_w.gather(1, pos), dtype, "autograd dvalues")


@FUZZ
@given(p=problem(semi24=True), method=st.sampled_from(METHODS))
def test_semi24_ops_match_dense_on_well_formed_input(p, method):
    s, x, dy, bias = p
    run_semi24(s.values, s.meta, s.shape, x, dy, bias, method, malformed=False)


@FUZZ
@given(p=problem(semi24=True), method=st.sampled_from(METHODS), data=st.data())
def test_semi24_ops_refuse_malformed_input(p, method, data):
    s, x, dy, bias = p
    out_f, in_f = s.shape
    values, meta = s.values, s.meta.clone()
    kinds = ["meta_int16", "meta_width", "meta_rows", "values_cols", "x_features", "values_fp16"]
    if meta.numel():
        kinds += ["meta_random", "meta_byte"]
    if not torch.stack([meta, meta], 2)[:, :, 0].is_contiguous():  # a view of one row, or none, still is
        kinds.append("meta_strided")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    structural = kind in ("meta_random", "meta_byte")
    if kind == "meta_random":
        meta = torch.tensor(data.draw(st.lists(st.integers(0, 255), min_size=meta.numel(), max_size=meta.numel()),
                                      label="meta"), dtype=torch.uint8).reshape(meta.shape)
    elif kind == "meta_byte":
        k = data.draw(st.integers(0, meta.numel() - 1), label="k")
        meta.view(-1)[k] = data.draw(st.integers(0, 255), label="byte")
    elif kind == "meta_int16":
        meta = meta.to(torch.int16)
    elif kind == "meta_width":
        meta = torch.zeros(out_f, meta.shape[1] + 1, dtype=torch.uint8)
    elif kind == "meta_rows":
        meta = torch.zeros(out_f + 1, meta.shape[1], dtype=torch.uint8)
    elif kind == "values_cols":
        values = torch.zeros(out_f, in_f // 2 + 1, dtype=values.dtype)  # in_features no multiple of 4
    elif kind == "x_features":
        x = torch.randn(*x.shape[:-1], in_f + 8).to(x.dtype)  # +8: meta's width changes too
    elif kind == "meta_strided":
        meta = torch.stack([meta, meta], 2)[:, :, 0]
    elif kind == "values_fp16":
        values, x, dy = values.half(), x.half(), dy.half()
        bias = bias.half() if bias is not None else None
    if structural:
        try:
            validate_semi24(values, meta, s.shape)
            malformed = False
        except (ValueError, TypeError):
            malformed = True
        run_semi24(values, meta, s.shape, x, dy, bias, method, malformed)
    else:
        with kernel_policy(method), torch.no_grad():
            call("semi24_linear", True, lambda: ops.semi24_linear(x, values, meta, bias))
            if kind != "x_features":  # dX takes no x
                call("semi24_linear_backward_input", True, lambda: ops.semi24_linear_backward_input(dy, values, meta))
            if kind != "values_cols":  # the sddmm takes no values
                call("semi24_sddmm", True, lambda: ops.semi24_sddmm(dy, x, meta))
    run_semi24(s.values, s.meta, s.shape, *p[1:], method, malformed=False)  # nothing was corrupted


# ---- checked once per structure: what re-checks, and what does not ------------------------------
def test_a_structure_written_in_place_after_it_passed_is_checked_again():
    c = CSRWeight.from_dense(torch.randn(8, 16), torch.ones(8, 16, dtype=torch.bool))
    x = torch.randn(4, 16)
    ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)  # passes, and is remembered
    k = int(c.row_ptr[1]) + 1  # the second entry of row 1
    with torch.no_grad():
        c.col_idx[k] = c.col_idx[k - 1]  # in place: the version counter moves
    with pytest.raises(ValueError, match="duplicated within row 1"):
        ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)
    s = Semi24Weight.from_dense(torch.randn(4, 16))
    ops.semi24_linear(x, s.values, s.meta, None)
    s.meta[2, 1] = 0x00  # positions 0 and 0
    with pytest.raises(ValueError, match="malformed 2:4 meta at row 2"):
        ops.semi24_linear(x, s.values, s.meta, None)


def test_every_call_mode_catches_writes_that_bypass_the_version_counter():
    c = CSRWeight.from_dense(torch.randn(8, 16), torch.ones(8, 16, dtype=torch.bool))
    x = torch.randn(4, 16)
    ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)
    c.col_idx.data[3] = c.col_idx[2]  # .data has its own version counter: not seen in "once" mode
    assert ops.get_structure_checks() == "once"
    ops.set_structure_checks("every_call")
    try:
        with pytest.raises(ValueError, match="duplicated within row 0"):
            ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)
    finally:
        ops.set_structure_checks("once")
    with pytest.raises(ValueError, match="'once' or 'every_call'"):
        ops.set_structure_checks("never")


def test_inference_tensors_are_checked_every_call():
    with torch.inference_mode():
        c = CSRWeight.from_dense(torch.randn(8, 16), torch.ones(8, 16, dtype=torch.bool))
        x = torch.randn(4, 16)
        ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)
        c.col_idx[5] = 0  # inference tensors have no version counter
        with pytest.raises(ValueError, match="unsorted within row 0"):
            ops.csr_linear(x, c.values, c.row_ptr, c.col_idx, 8, 16, None)


def test_the_same_index_is_checked_again_for_another_shape():
    c = CSRWeight.from_dense(torch.randn(8, 16), torch.ones(8, 16, dtype=torch.bool))
    ops.csr_linear(torch.randn(2, 16), c.values, c.row_ptr, c.col_idx, 8, 16, None)
    with pytest.raises(ValueError, match="outside"):  # column 15 is outside 12 input features
        ops.csr_linear(torch.randn(2, 12), c.values, c.row_ptr, c.col_idx, 8, 12, None)
