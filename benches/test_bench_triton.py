"""GPU speed of the Triton kernels (skipped without CUDA): dense cuBLAS (F.linear), torch.sparse CSR
(cuSPARSE), to_sparse_semi_structured (cuSPARSELt / CUTLASS) for 2:4, and ours, on T5 shapes in
fp16 and bf16. Goals: CSR >= 2x cuSPARSE; 2:4 within 1.2x of cuSPARSELt.

    pytest benches/test_bench_triton.py
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOKENS = 4096
SHAPES = {"t5-small FFN wi 512->2048": (512, 2048), "t5-small FFN wo 2048->512": (2048, 512),
          "t5-base FFN wi 768->3072": (768, 3072)}


def _timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["dense", "torch_sparse", "triton"])
def test_csr(record, shape, sparsity, dtype, provider):
    from sparse_t5 import SparseLinear

    inn, out = SHAPES[shape]
    w = torch.randn(out, inn, device="cuda") * (torch.rand(out, inn, device="cuda") >= sparsity)
    x = torch.randn(TOKENS, inn, device="cuda", dtype=dtype)
    if provider == "dense":
        wd = w.to(dtype)
        fn = lambda: F.linear(x, wd)  # noqa: E731
    elif provider == "torch_sparse":
        csr = w.to(dtype).to_sparse_csr()
        fn = lambda: torch.sparse.mm(csr, x.t())  # noqa: E731
    else:
        layer = SparseLinear.from_dense(w, w != 0).to(device="cuda", dtype=dtype)
        fn = lambda: layer(x)  # noqa: E731
    record(f"gpu csr fwd {shape} s={sparsity} {dtype}", provider, _timed(fn))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("provider", ["dense", "semi_structured", "triton"])
def test_semi24(record, shape, dtype, provider):
    from sparse_t5 import SparseLinear

    inn, out = SHAPES[shape]
    layer = SparseLinear.from_dense(torch.randn(out, inn, device="cuda"), format="2:4").to(dtype=dtype)
    wd = layer.to_dense()
    x = torch.randn(TOKENS, inn, device="cuda", dtype=dtype)
    if provider == "dense":
        fn = lambda: F.linear(x, wd)  # noqa: E731
    elif provider == "semi_structured":
        from torch.sparse import to_sparse_semi_structured

        ws = to_sparse_semi_structured(wd)
        fn = lambda: F.linear(x, ws)  # noqa: E731
    else:
        fn = lambda: layer(x)  # noqa: E731
    record(f"gpu 2:4 fwd {shape} {dtype}", provider, _timed(fn))
