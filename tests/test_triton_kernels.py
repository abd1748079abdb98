"""Triton kernels (triton_kernels/, installed as sparse_t5_triton), verified in Triton's interpreter
on CPU tensors (TRITON_INTERPRET=1; fp32 and fp16). Each check runs in a child process, because the
interpreter is chosen when triton is imported.

- every kernel against the dense masked reference on awkward shapes: empty rows, K not a multiple of
  the block, one token, an all-zero weight;
- the op-level tests of tests/test_csr_linear.py and tests/test_semi24_linear.py through the Triton
  path (SPARSE_T5_TRITON_ON_CPU=1 registers the Triton bodies for CPU tensors; the session fails if no
  op actually went through Triton).
- the autotuner's side effects: under the interpreter every kernel is tuned over two configs with a
  benchmark that launches each config several times into the real arguments, as Triton does on a GPU
  (triton_kernels/autotune.py), and every op's first call on fresh shapes must match the reference;
- validation: malformed CSR structures and 2:4 metadata given straight to the Triton bodies raise
  the CPU ops' ValueError instead of gathering out of bounds.
What the interpreter cannot show: GPU speed, and bf16 (no bf16 arithmetic in the interpreter); the
bf16 test below, and tests/test_cuda.py, run only on a CUDA machine.
"""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = dict(os.environ, TRITON_INTERPRET="1")

KERNEL_CHECK = r"""
import torch, torch.nn.functional as F
from sparse_t5_triton import csr_linear as tc, semi24_linear as ts
from sparse_t5.formats import CSRWeight, Semi24Weight
torch.manual_seed(0)
tol = {torch.float32: 1e-5, torch.float16: 2e-3}
def rel(a, b):
    b = b.double(); return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))
n = 0
for dtype in (torch.float32, torch.float16):
    for T, inn, out, density in ((5, 37, 21, 0.5), (1, 16, 8, 0.7), (33, 52, 17, 0.3), (7, 24, 12, 0.0)):
        W = torch.randn(out, inn); m = torch.rand(out, inn) < density; m[1] = False  # an empty row
        w = CSRWeight.from_dense(W, m); Wd = (W * m).double()
        x = torch.randn(T, inn).to(dtype); dy = torch.randn(T, out).to(dtype); b = torch.randn(out).to(dtype)
        y = tc.csr_linear(x, w.values.to(dtype), w.row_ptr, w.col_idx, out, inn, b)
        ref = F.linear(x.double(), Wd, b.double())
        assert rel(y, ref) <= tol[dtype], ("csr fwd", dtype, T, inn, rel(y, ref))
        dx = tc.csr_linear_backward_input(dy, w.values.to(dtype), w.row_ptr, w.col_idx, out, inn)
        if density > 0:
            assert rel(dx, dy.double() @ Wd) <= tol[dtype], ("csr dx", dtype, T)
        else:
            assert torch.all(dx == 0)
        dv = tc.csr_sddmm(dy, x, w.row_ptr, w.col_idx, out, inn)
        if w.nnz:
            assert rel(dv, (dy.double().t() @ x.double())[m]) <= tol[dtype], ("csr sddmm", dtype, T)
        if inn % 4 == 0:
            s = Semi24Weight.from_dense(W); S = s.to_dense().double()
            y = ts.semi24_linear(x, s.values.to(dtype), s.meta, b)
            assert rel(y, F.linear(x.double(), S, b.double())) <= tol[dtype], ("2:4 fwd", dtype, T)
            dx = ts.semi24_linear_backward_input(dy, s.values.to(dtype), s.meta)
            assert rel(dx, dy.double() @ S) <= tol[dtype], ("2:4 dx", dtype, T)
            dv = ts.semi24_sddmm(dy, x, s.meta)
            assert rel(dv.flatten(), (dy.double().t() @ x.double())[s.mask()]) <= tol[dtype], ("2:4 sddmm", dtype, T)
        n += 1
import os
from sparse_t5_triton import transient_dense as td
dense_ran = sum(td.CALLS.values())
if os.environ["SPARSE_T5_KERNEL_POLICY"] == "dense":  # every op ran by the dense method
    assert len(td.CALLS) == 6 and tc.CALLS["csr_linear"] == td.CALLS["csr_linear"], (dict(td.CALLS), dict(tc.CALLS))
else:
    assert dense_ran == 0, dict(td.CALLS)
print("ok", n)
"""


@pytest.mark.parametrize("policy", ["sparse", "dense"])
def test_kernels_match_the_dense_reference_in_the_interpreter(policy):
    """Both exact methods of the GPU bodies (sparse_t5.kernel_policy): the Triton sparse kernels, and
    transient dense (Triton decompression / gather kernels around torch's GEMM)."""
    out = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=dict(ENV, SPARSE_T5_KERNEL_POLICY=policy),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.startswith("ok 8"), out.stderr[-4000:]


FIRST_CALL_CHECK = r"""
import torch, torch.nn.functional as F
from sparse_t5_triton import autotune, csr_linear as tc, semi24_linear as ts
from sparse_t5 import SparseLinear
torch.manual_seed(1)
# The autotuner must really benchmark: at least two configs for every kernel.
assert len(autotune.AUTOTUNED) == 5, sorted(autotune.AUTOTUNED)
for name, tuner in autotune.AUTOTUNED.items():
    assert len(tuner.configs) >= 2, (name, len(tuner.configs))
tol = {torch.float32: 1e-5, torch.float16: 2e-3}
def rel(a, b):
    b = b.double(); return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))
checked = 0
# Each (dtype, shape) is new to the process, so every kernel call below is the first of its autotune key.
for dtype in (torch.float32, torch.float16):
    for T, inn, out in ((9, 40, 19), (21, 72, 33), (3, 24, 50)):
        for fmt in ("csr", "2:4"):
            W = torch.randn(out, inn)
            layer = SparseLinear.from_dense(W, (torch.rand(out, inn) < 0.4) if fmt == "csr" else None, format=fmt,
                                            bias=torch.randn(out)).to(dtype)
            Wd = layer.to_dense().double()
            x = torch.randn(T, inn).to(dtype).requires_grad_()
            y = layer(x)
            yd = y.detach()
            ref = F.linear(x.detach().double(), Wd, layer.bias.detach().double())
            assert rel(yd, ref) <= tol[dtype], (fmt, "forward", dtype, T, rel(yd, ref))
            dy = torch.randn(T, out).to(dtype)
            y.backward(dy)
            assert rel(x.grad, dy.double() @ Wd) <= tol[dtype], (fmt, "dX", dtype, T, rel(x.grad, dy.double() @ Wd))
            dW = dy.double().t() @ x.detach().double()
            got = torch.zeros_like(Wd); got[layer.mask()] = layer.values.grad.double().flatten()
            assert rel(got, dW * layer.mask()) <= tol[dtype], (fmt, "dvalues", dtype, T)
            checked += 1
launches = tc.CALLS["csr_linear_backward_input"] + ts.CALLS["semi24_linear_backward_input"]
assert launches == checked, (launches, checked)
benchmarked = dict(autotune.BENCH_CALLS)
assert len(benchmarked) == 5 and min(benchmarked.values()) >= 2, benchmarked
print("ok", checked, benchmarked)
"""


def test_first_calls_of_fresh_shapes_are_exact_while_the_autotuner_benchmarks():
    """The autotuner launches every config into the real outputs before the first call of a shape
    returns: a kernel that accumulates into its output without reset_to_zero returns the sum of those
    launches (the CSR dX bug seen on an H100). Two configs and a multi-launch benchmark reproduce
    that on CPU; forward, dX and dvalues of both formats must match the dense reference at once."""
    env = dict(ENV, SPARSE_T5_TRITON_ON_CPU="1", SPARSE_T5_KERNEL_POLICY="sparse")  # the autotuned kernels
    out = subprocess.run([sys.executable, "-c", FIRST_CALL_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0 and out.stdout.startswith("ok 12"), out.stdout[-2000:] + out.stderr[-4000:]


MALFORMED_CHECK = r"""
import torch
from sparse_t5_triton import csr_linear as tc, semi24_linear as ts
from sparse_t5.formats import CSRWeight, Semi24Weight
w = CSRWeight.from_dense(torch.randn(6, 10), torch.rand(6, 10) < 0.5)
x = torch.randn(3, 10); dy = torch.randn(3, 6)
def expect(fn, words):
    try:
        fn()
    except ValueError as err:
        assert words in str(err), (words, str(err))
        return
    raise AssertionError("no ValueError for: " + words)
bad_cols = w.col_idx.clone(); bad_cols[0] = 10
bad_rows = w.row_ptr.clone(); bad_rows[2] = bad_rows[3] + 1  # decreases from row 2 to row 3
for rp, ci, words in ((w.row_ptr, bad_cols, "outside"), (bad_rows, w.col_idx, "not monotone")):
    expect(lambda: tc.csr_linear(x, w.values, rp, ci, 6, 10), words)
    expect(lambda: tc.csr_linear_backward_input(dy, w.values, rp, ci, 6, 10), words)
    expect(lambda: tc.csr_sddmm(dy, x, rp, ci, 6, 10), words)
# A structure validated once and then corrupted in place is checked again (its version moved).
good = w.col_idx.clone()
tc.csr_linear(x, w.values, w.row_ptr, good, 6, 10)
good[-1] = 99
expect(lambda: tc.csr_linear(x, w.values, w.row_ptr, good, 6, 10), "outside")
s = Semi24Weight.from_dense(torch.randn(6, 16))
meta = s.meta.clone(); meta[1, 0] = 0x00  # positions 0 and 0
xs = torch.randn(3, 16)
expect(lambda: ts.semi24_linear(xs, s.values, meta), "malformed meta")
expect(lambda: ts.semi24_linear_backward_input(dy, s.values, meta), "malformed meta")
expect(lambda: ts.semi24_sddmm(dy, xs, meta), "malformed meta")
expect(lambda: tc.csr_linear(torch.randn(3, 11), w.values, w.row_ptr, w.col_idx, 6, 10), "features")
print("ok")
"""


def test_malformed_structures_raise_before_any_kernel_runs():
    out = subprocess.run([sys.executable, "-c", MALFORMED_CHECK], env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]


def test_op_level_tests_run_through_triton():
    env = dict(ENV, SPARSE_T5_TRITON_ON_CPU="1")
    selection = [
        "tests/test_csr_linear.py::test_matches_dense_masked_reference",
        "tests/test_csr_linear.py::test_gradients_without_bias",
        "tests/test_csr_linear.py::test_empty_rows_and_no_bias",
        "tests/test_csr_linear.py::test_non_contiguous_inputs_are_handled",
        "tests/test_semi24_linear.py::test_matches_dense_masked_reference",
        "tests/test_layers.py::test_pattern_stays_two_of_four_after_adamw",
    ]
    # Left out, because the interpreter runs every program instance in Python (one block of nonzeros at
    # a time) and these shapes add no Triton path the others lack: the 1-token x 512-input shape (24k
    # nonzeros; 1 token is the 40-token shapes' partial tile), 2:4's 300-token x 1028-input shape (its
    # CPU L1 chunks; 96 and 124 inputs already span several BLOCK_K, 40 and 21 tokens several partial
    # token tiles) and CSR's 200-token 64 x 96 shape under the sparse method (the same: 3-D input is
    # (3, 7), several token tiles with a partial last are the 40-token shapes). Measured on 2 cores:
    # those three took 590 of this test's 745 s.
    deselect = "not 512 and not 1028 and not (sparse and 64-96)"
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "-k", deselect,
                          *selection],
                         env=env, capture_output=True, text=True, timeout=1500, cwd=os.path.dirname(HERE))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Triton launches:" in out.stdout and "semi24_linear" in out.stdout, out.stdout[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="bf16 arithmetic is not supported by Triton's interpreter: runs on a CUDA GPU only")
def test_bf16_on_gpu():
    import torch.nn.functional as F

    from sparse_t5 import SparseLinear

    for fmt in ("csr", "2:4"):
        w = torch.randn(64, 128, device="cuda")
        layer = SparseLinear.from_dense(w, (w.abs() > 0.5) if fmt == "csr" else None, format=fmt).cuda().bfloat16()
        x = torch.randn(40, 128, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x.float(), layer.to_dense().float())
        assert (layer(x).float() - ref).abs().max() <= 1e-2 * ref.abs().max()
