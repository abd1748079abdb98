"""The CUDA path on a real GPU: the Triton bodies of every op, the model and the DSI trainer.

Skipped without CUDA (CI has no GPU); run on a GPU machine with `pytest tests/test_cuda.py`. What
runs on CPU instead: tests/test_triton_kernels.py puts the same kernels through Triton's interpreter,
autotuner benchmarking included, in fp32 and fp16.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

from sparse_t5 import SparseLinear, SparseT5ForConditionalGeneration  # noqa: E402
from test_modeling_t5 import HFT5  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# awkward shapes: (tokens, in, out); the first of each dtype is new to the autotuner's cache
SHAPES = [(5, 124, 77), (1, 512, 48), (130, 64, 96), (33, 200, 3)]


def rel(a, b):
    b = b.double()
    return float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))


@pytest.mark.parametrize("fmt", ["csr", "2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_op_matches_the_dense_masked_reference_on_first_and_later_calls(fmt, dtype):
    torch.manual_seed(0)
    for T, inn, out in SHAPES:
        W = torch.randn(out, inn, device="cuda")
        mask = (torch.rand(out, inn, device="cuda") < 0.3) if fmt == "csr" else None
        if fmt == "csr":
            mask[1] = False  # an empty row
        layer = SparseLinear.from_dense(W, mask, format=fmt, bias=torch.randn(out, device="cuda")).to(dtype)
        Wd = layer.to_dense().double()
        for call in ("first", "second"):
            x = torch.randn(2, T, inn, device="cuda", dtype=dtype, requires_grad=True)  # 3-D input
            y = layer(x)
            ref = F.linear(x.detach().double(), Wd, layer.bias.detach().double())
            assert rel(y.detach(), ref) <= TOL[dtype], (call, "forward", T, inn, out)
            dy = torch.randn_like(y)
            layer.values.grad = None
            y.backward(dy)
            assert rel(x.grad, dy.double() @ Wd) <= TOL[dtype], (call, "dX", T, inn, out)
            dW = torch.einsum("bto,bti->oi", dy.double(), x.detach().double())
            got = torch.zeros_like(Wd)
            got[layer.mask()] = layer.values.grad.double().flatten()
            assert rel(got, dW * layer.mask()) <= TOL[dtype], (call, "dvalues", T, inn, out)


@pytest.mark.parametrize("fmt", ["csr", "2:4"])
def test_opcheck_on_cuda(fmt):
    from torch.library import opcheck

    W = torch.randn(24, 64, device="cuda")
    layer = SparseLinear.from_dense(W, (W.abs() > 0.7) if fmt == "csr" else None, format=fmt)
    x = torch.randn(6, 64, device="cuda", requires_grad=True)
    if fmt == "csr":
        args = (x, layer.values, layer.row_ptr, layer.col_idx, 24, 64, None)
        opcheck(torch.ops.sparse_t5.csr_linear.default, args)
        dy = torch.randn(6, 24, device="cuda")
        opcheck(torch.ops.sparse_t5.csr_linear_backward_input.default,
                (dy, layer.values.detach(), layer.row_ptr, layer.col_idx, 24, 64))
        opcheck(torch.ops.sparse_t5.csr_sddmm.default, (dy, x.detach(), layer.row_ptr, layer.col_idx, 24, 64))
    else:
        opcheck(torch.ops.sparse_t5.semi24_linear.default, (x, layer.values, layer.meta, None))


def test_malformed_structure_on_cuda_is_a_value_error_not_an_illegal_access():
    W = torch.randn(8, 16, device="cuda")
    layer = SparseLinear.from_dense(W, W.abs() > 0.5)
    bad = layer.col_idx.clone()
    bad[0] = 1000
    with pytest.raises(ValueError, match="outside"):
        torch.ops.sparse_t5.csr_linear(torch.randn(3, 16, device="cuda"), layer.values, layer.row_ptr, bad, 8, 16)
    torch.cuda.synchronize()  # the context is healthy: no kernel ran on the bad index
    layer(torch.randn(3, 16, device="cuda"))


def _hf_pair(tmp_path, sparsity):
    from transformers import T5Config

    torch.manual_seed(0)
    config = T5Config(vocab_size=101, d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=2, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = HFT5(config).eval()  # HF's T5, padded generation fixed on 4.49.0 as 4.50 did (test_modeling_t5)
    hf.save_pretrained(tmp_path / "hf")
    ours = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "hf", device_map="cuda")
    assert ours.device.type == "cuda"
    if sparsity:
        ours.sparsify(sparsity)
        with torch.no_grad():
            for name, layer in ours.sparse_layers().items():
                hf.get_submodule(name).weight.copy_(layer.to_dense().cpu())
    return hf.cuda(), ours


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_model_matches_hf_on_cuda(tmp_path, sparsity):
    hf, ours = _hf_pair(tmp_path, sparsity)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 101, (3, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.randint(2, 101, (3, 6), generator=g).cuda()
    out_hf = hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(out.logits.detach(), out_hf.logits.detach()) <= 1e-4
    assert rel(out.loss.detach(), out_hf.loss.detach()) <= 1e-4
    out_hf.loss.backward()
    out.loss.backward()
    for name, p in ours.named_parameters():
        if name.endswith(".values"):
            layer = ours.get_submodule(name[:-7])
            ref = hf.get_submodule(name[:-7]).weight.grad[layer.mask()]
        else:
            ref = dict(hf.named_parameters())[name].grad
        assert rel(p.grad, ref) <= 1e-4, name
    gen = dict(max_new_tokens=8, suppress_tokens=[0, 1], num_beams=4)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **gen),
                       hf.generate(input_ids=ids, attention_mask=mask, **gen))


def test_dsi_train_runs_on_cuda_and_reports_gpu_memory(tmp_path):
    from sparse_t5.cli import main

    out = tmp_path / "run"
    assert main(["dsi", "train", "--device", "cuda", "--model-size", "tiny", "--epochs", "1", "--out", str(out)]) == 0
    report = json.load(open(out / "report.json"))
    phase = report["phases"]["baseline"]
    assert phase["device"].startswith("cuda") and phase["peak_gpu_bytes"] > 0
    # a checkpoint written on the GPU resumes on the CPU
    model = SparseT5ForConditionalGeneration.from_pretrained(os.path.join(out, "baseline", "last"), map_location="cpu")
    assert model.device.type == "cpu"


def test_bf16_with_8bit_adamw_trains_saves_and_reloads_on_cuda(tmp_path):
    """The bf16 + 8-bit AdamW (stochastic rounding) recovery path of #34 on a GPU: the same checks as
    tests/test_optim.py runs on CPU (the loss falls, bf16 throughout, bf16 checkpoint, same logits)."""
    pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")
    from test_optim import bf16_training_round_trip

    bf16_training_round_trip(tmp_path, "cuda")
