"""The kernel policy: every op has two exact methods (sparse kernels, transient dense), chosen per
call by a measured table under "auto" or forced by the user; and the memory invariant of the
dense method (nothing dense saved for backward, a transient peak of panels, far below the
stated bound of two dense copies).

Policy: sparse_t5/kernel_policy.py, csrc/kernel_policy.cpp. Dense method:
csrc/transient_dense.cpp. The op-level suites (test_csr_linear.py, test_semi24_linear.py) run
every test under both methods (conftest.py `kernel_method`), on the C++ bodies and, through
test_triton_kernels.py, on the Triton bodies in the interpreter.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import sparse_t5
from sparse_t5 import SparseLinear
from sparse_t5.kernel_policy import (choose_method, get_kernel_policy, kernel_policy, load_table, select_table,
                                     set_kernel_policy)
from sparse_t5.memory import peak_rss_bytes, reset_peak_rss
from test_csr_linear import assert_close_rel

ops = torch.ops.sparse_t5
HERE = os.path.dirname(os.path.abspath(__file__))


def run_all_ops(fmt, dtype, seed=0, lead=(3, 37), out=70, in_=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g).to(dtype)
    mask = torch.rand(out, in_, generator=g) < 0.4 if fmt == "csr" else None
    layer = SparseLinear.from_dense(w, mask, bias=torch.randn(out, generator=g).to(dtype), format=fmt)
    x = torch.randn(*lead, in_, generator=g).to(dtype).requires_grad_()
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=g).to(dtype))
    return y.detach(), x.grad, layer.values.grad, layer.bias.grad


@pytest.mark.parametrize("fmt", ["csr", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_every_policy_gives_the_same_result(fmt, dtype):
    results = {}
    for policy in ("sparse", "dense", "mkl", "sparse_narrow", "auto"):
        with kernel_policy(policy):
            results[policy] = run_all_ops(fmt, dtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    for policy in ("dense", "mkl", "sparse_narrow", "auto"):
        for name, a, b in zip(("y", "dx", "dvalues", "dbias"), results["sparse"], results[policy]):
            scale = b.double().abs().max().item()
            err = (a.double() - b.double()).abs().max().item()
            assert err <= tol * scale, f"{fmt} {dtype} {policy} {name}: {err:.3e} > {tol} x {scale:.3e}"


# dX takes row panels summed into one partial dX per thread while (threads - 1) * tokens <= out, and
# column panels past that (csrc/transient_dense.cpp, panel_backward_input). On 2 threads:
#   rows:    2040 x 300, 5 tokens. The forward, dvalues and dX take 6 row panels (336 or 352 rows,
#            on 16-row boundaries, the last 344, ragged), 3 per thread; 300 columns hold 75 2:4
#            groups, an odd count.
#   columns: 64 x 4100, 120 tokens. dX takes 4 column panels (1024 columns, the last 1028,
#            ragged); 1025 2:4 groups.
@pytest.mark.parametrize("fmt", ["csr", "2:4"])
@pytest.mark.parametrize("out,in_,lead", [(2040, 300, (5,)), (64, 4100, (3, 40))], ids=["rows", "columns"])
def test_the_dense_method_over_several_ragged_panels(fmt, out, in_, lead):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for policy in ("sparse", "dense"):
            with kernel_policy(policy):
                got = run_all_ops(fmt, torch.float64, seed=3, lead=lead, out=out, in_=in_)
            if policy == "sparse":
                want = got
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("y", "dx", "dvalues", "dbias"), want, got):
        err = (a - b).abs().max().item()
        assert err <= 1e-12 * b.abs().max().item(), f"{fmt} {name}: {err:.3e}"


@pytest.fixture(params=[0, 1, 2, 4, 8])
def tile_vectors(request):
    """Each width set_tile_vectors forces on the tiled CPU kernels, then 0 (the rules' own)."""
    ops.set_tile_vectors(request.param)
    yield request.param
    ops.set_tile_vectors(0)


def _csr(out, in_, density, dtype, index_dtype, g):
    mask = torch.rand(out, in_, generator=g) < density
    mask[min(3, out - 1)] = False  # an empty row
    w = (torch.randn(out, in_, generator=g) * mask).to(dtype)
    rows, cols = mask.nonzero(as_tuple=True)
    row_ptr = torch.zeros(out + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(mask.sum(1), 0)
    return w, mask, w[rows, cols].contiguous(), row_ptr, cols.to(index_dtype).contiguous()


# Token counts: where the rules narrow a padded tile (96 and 224 for the forwards and the 2:4 dx;
# 96 and 160 for the CSR dW; 160 for the CSR dx scatter on 2 threads too; 288 and 320 for the 2:4
# dW's 8-vector tiles), the controls where they do not (64, 256, 384), and a partial tile of each
# width (9, 20, 40).
TILE_TOKENS = (9, 20, 40, 64, 96, 160, 224, 256, 288, 320, 384)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("index_dtype", [torch.uint16, torch.int32])
def test_every_tile_width_of_the_csr_ops_matches_dense(tile_vectors, dtype, index_dtype):
    """The CSR forward, both dx paths (scatter; the forward over a transient transpose) and dW, at each
    forced tile width and the rules' own, against the dense reference: long rows (the 4-vector
    forward, chunked and not), short rows, an empty row, an empty layer."""
    g = torch.Generator().manual_seed(11)
    before = ops.get_csr_dx_transpose_tokens()
    try:
        with kernel_policy("sparse"):
            for out, in_, density in ((40, 1100, 0.5), (70, 96, 0.3), (16, 40, 0.0)):
                w, mask, values, row_ptr, cols = _csr(out, in_, density, dtype, index_dtype, g)
                if tile_vectors:
                    want = min(tile_vectors, 4)
                    assert ops.csr_forward_tiling(96, dtype, values.numel(), out, in_)[0] == want
                for tokens in TILE_TOKENS:
                    x = torch.randn(tokens, in_, generator=g).to(dtype)
                    dy = torch.randn(tokens, out, generator=g).to(dtype)
                    what = f"{tile_vectors} vectors, {out}x{in_} at {density}, {tokens} tokens"
                    assert_close_rel(ops.csr_linear(x, values, row_ptr, cols, out, in_, None), x.double() @ w.double().T, dtype,
                           "forward, " + what)
                    for transpose_from in (0, 1):
                        ops.set_csr_dx_transpose_tokens(transpose_from)
                        assert_close_rel(ops.csr_linear_backward_input(dy, values, row_ptr, cols, out, in_),
                               dy.double() @ w.double(), dtype, f"dx (transpose from {transpose_from}), " + what)
                    assert_close_rel(ops.csr_sddmm(dy, x, row_ptr, cols, out, in_), (dy.double().T @ x.double())[mask], dtype,
                           "dW, " + what)
    finally:
        ops.set_csr_dx_transpose_tokens(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_every_tile_width_of_the_semi24_ops_matches_dense(tile_vectors, dtype):
    """The 2:4 forward, dx and dW at each forced tile width (8: the dW's widest; the others take 4)
    and the rules' own, against the dense reference; 2 L1 chunks of groups and one."""
    from sparse_t5.formats import Semi24Weight

    g = torch.Generator().manual_seed(12)
    with kernel_policy("sparse"):
        for out, in_ in ((40, 1028), (33, 96)):
            sw = Semi24Weight.from_dense(torch.randn(out, in_, generator=g).to(dtype))
            w = sw.to_dense().double()
            for tokens in TILE_TOKENS:
                x = torch.randn(tokens, in_, generator=g).to(dtype)
                dy = torch.randn(tokens, out, generator=g).to(dtype)
                what = f"{tile_vectors} vectors, {out}x{in_}, {tokens} tokens"
                assert_close_rel(ops.semi24_linear(x, sw.values, sw.meta, None), x.double() @ w.T, dtype, "forward, " + what)
                assert_close_rel(ops.semi24_linear_backward_input(dy, sw.values, sw.meta), dy.double() @ w, dtype, "dx, " + what)
                assert_close_rel(ops.semi24_sddmm(dy, x, sw.meta).flatten(), (dy.double().T @ x.double())[w != 0], dtype,
                       "dW, " + what)


def test_tile_vectors_setting_is_checked():
    for bad in (-1, 3, 16):
        with pytest.raises(ValueError, match=f"tile_vectors must be 0 \\(the rules\\), 1, 2, 4 or 8, got {bad}"):
            ops.set_tile_vectors(bad)
    assert ops.get_tile_vectors() == 0


def test_the_dense_method_is_the_one_that_runs():
    # A forced policy must change what runs, or the equality test above would compare a method with
    # itself. The dense method's panels are GEMMs: under the profiler they show as aten::mm.
    # One thread: the panels are claimed dynamically (csrc/cpu/parallel.h), and a panel a pool worker
    # took does not show in the profile of the calling thread (it flaked 3 in 15 runs beside a busy job).
    layer = SparseLinear.from_dense(torch.randn(64, 96), torch.rand(64, 96) < 0.5)
    x = torch.randn(10, 96)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for policy, expect_mm, expect_csr in (("dense", True, False), ("sparse", False, False), ("mkl", True, True)):
            with kernel_policy(policy), torch.profiler.profile() as prof:
                layer(x)
            names = {e.name for e in prof.events()}
            assert ("aten::mm" in names) == expect_mm, (policy, sorted(names))
            assert ("aten::_sparse_csr_tensor_unsafe" in names) == expect_csr, (policy, sorted(names))
        # bf16 has no MKL kernel: "mkl" runs such a call sparse
        with kernel_policy("mkl"), torch.profiler.profile() as prof:
            SparseLinear.from_dense(torch.randn(64, 96), torch.rand(64, 96) < 0.5).to(torch.bfloat16)(
                x.to(torch.bfloat16))
        assert "aten::mm" not in {e.name for e in prof.events()}
    finally:
        torch.set_num_threads(threads)


def test_auto_takes_mkl_where_its_table_row_says(tmp_path):
    row = dict(op="csr_linear", dtype="float32", tokens=8, out=64, **{"in": 96}, density=0.5, method="mkl")
    path = tmp_path / "mkl.json"
    path.write_text(json.dumps({"rows": [row]}))
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.randn(64, 96), torch.rand(64, 96) < 0.5)
    x = torch.randn(8, 96)
    try:
        load_table("cpu", str(path))
        assert choose_method("cpu", "csr_linear", torch.float32, 8, 64, 96, 0.5) == "mkl"
        assert choose_method("cpu", "csr_sddmm", torch.float32, 8, 64, 96, 0.5) == "sparse"  # no row: CPU fallback
        with torch.profiler.profile() as prof:
            y = layer(x)
        assert "aten::_sparse_csr_tensor_unsafe" in {e.name for e in prof.events()}
        with kernel_policy("sparse"):
            want = layer(x)
        # MKL sums in another order: the fp32 tolerance of test_every_policy_gives_the_same_result
        # (1e-5 of the output's scale; 1.5e-6 on a 0.03 entry was measured against 1e-6 absolute)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5 * want.abs().max().item())
    finally:
        select_table("cpu")
    # MKL is a method of the CPU CSR forward only
    for bad in (dict(row, op="csr_sddmm"), dict(row, op="semi24_linear")):
        path.write_text(json.dumps({"rows": [bad]}))
        with pytest.raises(ValueError, match="malformed kernel table row"):
            load_table("cpu", str(path))
    with pytest.raises(ValueError, match="malformed method table row"):
        ops.set_method_table("cuda", torch.tensor([[0.0, 6, 8, 64, 96, 0.5, 2]], dtype=torch.float64))
    with pytest.raises(ValueError, match="malformed method table row"):
        ops.set_method_table("cpu", torch.tensor([[2.0, 6, 8, 64, 96, 0.5, 2]], dtype=torch.float64))


def test_auto_takes_the_narrow_tile_where_its_table_row_says(tmp_path):
    """"sparse_narrow" (the CSR forward's 2-vector tile where the rule gives 4): chosen by its row,
    the same result as the wide tile at a shape where the two differ, and the CPU CSR forward's only."""
    row = dict(op="csr_linear", dtype="float32", tokens=256, out=96, **{"in": 1100}, density=0.6,
               method="sparse_narrow")
    path = tmp_path / "narrow.json"
    path.write_text(json.dumps({"rows": [row]}))
    torch.manual_seed(0)
    layer = SparseLinear.from_dense(torch.randn(96, 1100), torch.rand(96, 1100) < 0.6)
    x = torch.randn(256, 1100)
    assert ops.csr_forward_tiling(256, torch.float32, layer.nnz, 96, 1100, "sparse")[0] == 4
    assert ops.csr_forward_tiling(256, torch.float32, layer.nnz, 96, 1100, "sparse_narrow")[0] == 2
    try:
        load_table("cpu", str(path))
        assert choose_method("cpu", "csr_linear", torch.float32, 256, 96, 1100, 0.6) == "sparse_narrow"
        assert choose_method("cpu", "csr_sddmm", torch.float32, 256, 96, 1100, 0.6) == "sparse"
        y = layer(x)
        with kernel_policy("sparse"):
            want = layer(x)
        # the same products, summed in another order (the narrow tile walks the input in chunks
        # and splits each row's sum over more accumulators): the fp32 tolerance of the policies above
        assert not torch.equal(y, want)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-5 * want.abs().max().item())
    finally:
        select_table("cpu")
    for bad in (dict(row, op="csr_linear_backward_input"), dict(row, op="semi24_linear")):
        path.write_text(json.dumps({"rows": [bad]}))
        with pytest.raises(ValueError, match="malformed kernel table row"):
            load_table("cpu", str(path))
    with pytest.raises(ValueError, match="malformed method table row"):
        ops.set_method_table("cuda", torch.tensor([[0.0, 6, 8, 64, 96, 0.5, 3]], dtype=torch.float64))


def test_policy_context_manager_restores_and_rejects_bad_names():
    assert get_kernel_policy() == "auto"
    with kernel_policy("dense"):
        assert get_kernel_policy() == "dense"
        with kernel_policy("sparse"):
            assert get_kernel_policy() == "sparse"
        assert get_kernel_policy() == "dense"
    assert get_kernel_policy() == "auto"
    with pytest.raises(ValueError, match="kernel policy"):
        set_kernel_policy("fast")
    with pytest.raises(ValueError, match="kernel policy"):
        ops.set_kernel_policy("fast")
    assert sparse_t5.kernel_policy is kernel_policy


def test_environment_variable_sets_the_policy():
    code = "import sparse_t5; print(sparse_t5.get_kernel_policy())"
    for value in ("dense", "sparse"):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, SPARSE_T5_KERNEL_POLICY=value),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == value, out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, SPARSE_T5_KERNEL_POLICY="fastest"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SPARSE_T5_KERNEL_POLICY" in out.stderr


def test_auto_takes_the_nearest_measured_row(tmp_path):
    rows = [dict(op="csr_linear", dtype="float32", tokens=16, out=512, **{"in": 512}, density=0.1, method="sparse"),
            dict(op="csr_linear", dtype="float32", tokens=1024, out=512, **{"in": 512}, density=0.8, method="dense"),
            dict(op="csr_sddmm", dtype="float32", tokens=16, out=512, **{"in": 512}, density=0.1, method="dense")]
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"rows": rows}))
    try:
        assert load_table("test-class", str(path))
        pick = lambda op, tokens, density, dtype=torch.float32: choose_method(  # noqa: E731
            "test-class", op, dtype, tokens, 512, 512, density)
        assert pick("csr_linear", 8, 0.1) == "sparse"
        assert pick("csr_linear", 2048, 0.7) == "dense"
        assert pick("csr_sddmm", 2048, 0.7) == "dense"  # the only sddmm row
        # no row for the op or dtype: the fallback, transient dense for any class but "cpu"
        assert pick("csr_linear_backward_input", 16, 0.1) == "dense"
        assert pick("csr_linear", 8, 0.1, torch.float64) == "dense"
        with kernel_policy("sparse"):
            assert pick("csr_linear", 2048, 0.7) == "sparse"
        with kernel_policy("dense"):
            assert pick("csr_linear", 8, 0.1) == "dense"
    finally:
        ops.set_method_table("test-class", torch.zeros(0, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="malformed"):
        ops.set_method_table("test-class", torch.tensor([[9.0, 6, 16, 512, 512, 0.1, 0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown op"):
        choose_method("cpu", "conv2d", torch.float32, 16, 8, 8, 0.5)


def test_a_layer_and_its_transpose_take_their_own_rows(tmp_path):
    """Out and in are separate axes of the lookup: T5's wi (3072 x 768) and wo (768 x 3072) have the
    same out * in but not the same costs. With one size axis the transpose tied and the first row
    in the table won, even at the other shape's own measured point."""
    rows = [dict(op="semi24_sddmm", dtype="float32", tokens=4, out=3072, **{"in": 768}, density=0.5, method="dense"),
            dict(op="semi24_sddmm", dtype="float32", tokens=4, out=768, **{"in": 3072}, density=0.5, method="sparse")]
    path = tmp_path / "transpose.json"
    path.write_text(json.dumps({"rows": rows}))
    try:
        assert load_table("test-class", str(path))
        for tokens in (4, 3, 16):  # its own point, and off the grid on either side
            assert choose_method("test-class", "semi24_sddmm", torch.float32, tokens, 768, 3072, 0.5) == "sparse"
            assert choose_method("test-class", "semi24_sddmm", torch.float32, tokens, 3072, 768, 0.5) == "dense"
    finally:
        ops.set_method_table("test-class", torch.zeros(0, 7, dtype=torch.float64))


def test_committed_cpu_table_is_loaded_and_measured():
    path = os.path.join(os.path.dirname(sparse_t5.__file__), "kernel_tables", "cpu.json")
    table = json.load(open(path))
    assert table["device_class"] == "cpu" and table["rows"]
    for row in table["rows"]:
        faster = min(("sparse", "dense", "mkl", "sparse_narrow"), key=lambda m: row["ms"].get(m, float("inf")))
        assert row["method"] == faster, row
    # the loaded table answers like its rows: each row's own figures pick its own method (pinned: a
    # table `sparse-t5 tune` wrote in this user's cache would otherwise come first, tests/test_tune.py)
    assert load_table("cpu", path)["source"] == "file"
    try:
        for row in table["rows"]:
            got = choose_method("cpu", row["op"], getattr(torch, row["dtype"]), row["tokens"], row["out"], row["in"],
                                row["density"])
            assert got == row["method"], row
    finally:
        select_table("cpu")


@pytest.mark.parametrize("fmt", ["csr", "2:4"])
def test_nothing_dense_is_saved_for_backward(fmt):
    out, in_ = 256, 512
    layer = SparseLinear.from_dense(torch.randn(out, in_), torch.rand(out, in_) < 0.3 if fmt == "csr" else None,
                                    format=fmt)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, in_, requires_grad=True)
    for policy in ("sparse", "dense"):
        saved.clear()
        with kernel_policy(policy), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.sum().backward()
        assert saved and max(saved) < out * in_, (policy, saved)


def test_transient_peak_is_panels_not_a_dense_copy_of_the_layer():
    # A layer whose dense copy (64 MiB) dwarfs everything else the call touches: 16 tokens of
    # activations are 256 KiB, the values at density 0.05 3.2 MiB. The dense method works on panels
    # (about 1 MiB per worker thread, kept between calls; dX adds a 256 KiB partial per extra
    # thread), so a step's transient peak is far below one dense copy; the invariant stated in
    # sparse_t5/kernel_policy.py is at most two. Whole-layer decompression for dX measured 64 MiB here.
    out, in_, tokens = 4096, 4096, 16
    dense_bytes = out * in_ * 4
    layer = SparseLinear.from_dense(torch.randn(out, in_), torch.rand(out, in_) < 0.05)
    x = torch.randn(tokens, in_, requires_grad=True)
    dy = torch.randn(tokens, out)
    with kernel_policy("dense"):
        layer(x).backward(dy)  # warm-up: the allocator's, the libraries' and the panels' one-time costs
        x.grad = None
        layer.zero_grad()
        if not reset_peak_rss():
            pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
        # The instrument first: a dense copy of the layer, touched and freed, must show in the peak.
        base = peak_rss_bytes()
        torch.ones(out, in_)
        assert peak_rss_bytes() - base >= dense_bytes // 2, "peak RSS does not see a dense copy of the layer"
        reset_peak_rss()
        base = peak_rss_bytes()
        layer(x).backward(dy)
        peak = peak_rss_bytes() - base
    assert peak <= dense_bytes // 8, f"transient peak {peak / 2**20:.0f} MiB: a dense copy of the layer ({dense_bytes / 2**20:.0f} MiB) is being made"
