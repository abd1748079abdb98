"""sparse_t5.optim: torchao's 8-/4-bit AdamW on our sparse values (any length), bf16 weights with
stochastic rounding or an fp32 master copy, the state dict round trip, resume, the remapping when a
layer shrinks, and the combinations refused with a clear error. (The trainer and transformers'
Trainer with these options: tests/test_dsi.py, tests/test_hf_trainer.py.)"""
import io

import pytest
import torch
from transformers import T5Config

from sparse_t5 import SparseT5ForConditionalGeneration
from sparse_t5.layers import SparseLinear
from sparse_t5.optim import make_optimizer, state_bytes_per_element

torchao_optim = pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")

# Lengths like a pruned layer's nnz: none but the third is a multiple of the block size.
LENGTHS = (100, 300, 256 * 20, 256 * 20 + 77, 4096 + 7)


def params(lengths=LENGTHS, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g).to(dtype)) for n in lengths]


def set_grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("name,bits", [("adamw8bit", 8), ("adamw4bit", 4)])
def test_moments_are_quantized_whatever_the_length(name, bits):
    ps = params()
    opt = make_optimizer(ps, name, lr=1e-3)
    set_grads(ps, 1)
    opt.step()
    block = opt.block_size
    for p in ps:
        state = opt.state[p]
        if p.numel() < block:  # not one full block: the moments stay in the parameter's dtype
            assert type(state["exp_avg"]) is torch.Tensor and "exp_avg_tail" not in state
            continue
        assert type(state["exp_avg"]).__name__ == f"OptimState{bits}bit"
        assert state["exp_avg"].numel() == p.numel() - p.numel() % block
        assert state.get("exp_avg_tail", torch.empty(0)).numel() == p.numel() % block
        # codes + one fp32 scale per block for each moment, + the short tail in fp32, + the quantization
        # maps (2 x 256 or 2 x 16 fp32 per parameter)
        qmap = 2 * (2 ** bits) * 4
        expected = (2 * (bits / 8 * (p.numel() - p.numel() % block) + 4 * (p.numel() // block))
                    + 2 * 4 * (p.numel() % block) + qmap) / p.numel()
        assert state_bytes_per_element(opt, p) == pytest.approx(expected, rel=1e-6)
    long = ps[-1]  # 4103 values: about 2 B (8-bit) or 1 B (4-bit) of moments per value
    assert state_bytes_per_element(opt, long) < {8: 2.7, 4: 1.4}[bits]


def test_torchao_alone_keeps_full_precision_moments_for_a_pruned_layers_length():
    """Why sparse_t5.optim exists: torchao quantizes only lengths that are multiples of its block
    size (and >= 4096), and a pruned layer's nnz rarely is."""
    ps = params((256 * 20 + 77, 256 * 20))
    opt = torchao_optim.AdamW8bit(ps, lr=1e-3)
    set_grads(ps, 1)
    opt.step()
    assert type(opt.state[ps[0]]["exp_avg"]) is torch.Tensor  # 8 B of fp32 moments per value
    assert state_bytes_per_element(opt, ps[0]) == 8.0
    ours = make_optimizer(params((256 * 20 + 77,)), "adamw8bit", lr=1e-3)
    p = ours.param_groups[0]["params"][0]
    set_grads([p], 1)
    ours.step()
    assert state_bytes_per_element(ours, p) < 2.6


@pytest.mark.parametrize("name,tol", [("adamw8bit", 0.15), ("adamw4bit", 0.5)])
def test_update_follows_adamw(name, tol):
    """fp32 weights: five steps land close to torch's AdamW; the gap is the moments' quantization
    (measured: at most 0.04 of the largest distance moved for 8 bits, 0.43 for 4 bits' 16 levels), where
    a wrong update (a sign, a missing bias correction) would be off by the distance itself or more."""
    ps, ref = params(), params()
    start = [p.detach().clone() for p in ps]
    opt = make_optimizer(ps, name, lr=1e-2, weight_decay=0.01)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    for step in range(5):
        set_grads(ps, step)
        set_grads(ref, step)
        opt.step()
        torch_opt.step()
    for p, q, s in zip(ps, ref, start):
        moved = (q - s).abs().max()
        assert moved > 0.03
        assert (p - q).abs().max() <= tol * moved, (p.numel(), (p - q).abs().max(), moved)


def test_bf16_updates_below_half_an_ulp_survive_rounding_or_master():
    """A bf16 weight at 1.0 has an ulp of 2**-7: an Adam step of lr = 1e-3 rounds back to 1.0 unless it
    is rounded stochastically (unbiased: the mean moves by the steps' sum) or kept in an fp32 master."""
    n, steps, lr = 8192, 20, 1e-3

    def run(**options):
        p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = make_optimizer([p], "adamw8bit", lr=lr, **options)
        torch.manual_seed(0)
        for _ in range(steps):
            p.grad = torch.ones(n, dtype=torch.bfloat16)  # Adam's step is then lr each time
            opt.step()
        return p, opt

    nearest, _ = run()
    assert torch.all(nearest == 1.0)  # every update lost
    sr, _ = run(bf16_stochastic_round=True)
    assert sr.float().mean().item() == pytest.approx(1 - steps * lr, abs=0.1 * steps * lr)
    assert len(torch.unique(sr)) > 1  # rounded up or down, value by value
    master, opt = run(master_weights=True)
    m = opt.state[master]["master"]
    assert m.dtype == torch.float32 and m.mean().item() == pytest.approx(1 - steps * lr, rel=1e-3)
    assert torch.equal(master.detach(), m.to(torch.bfloat16))


@pytest.mark.parametrize("options", [{}, {"bf16_stochastic_round": True}, {"master_weights": True}],
                         ids=["fp32", "bf16-sr", "bf16-master"])
def test_state_dict_round_trip_resumes_exactly(options):
    dtype = torch.float32 if not options else torch.bfloat16

    def train(ps, opt, steps):
        for step in steps:
            set_grads(ps, step)
            torch.manual_seed(step)  # stochastic rounding draws from the global generator
            opt.step()

    full = params(dtype=dtype)
    train(full, make_optimizer(full, "adamw8bit", lr=1e-2, **options), range(5))
    killed = params(dtype=dtype)
    opt = make_optimizer(killed, "adamw8bit", lr=1e-2, **options)
    train(killed, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in killed], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    blob = torch.load(buffer, weights_only=True)  # as the trainer's resume loads it
    resumed = [torch.nn.Parameter(t.clone()) for t in blob["params"]]
    opt = make_optimizer(resumed, "adamw8bit", lr=1e-2, **options)
    opt.load_state_dict(blob["optimizer"])
    if "master_weights" in options:  # torch casts floating state to the parameter's dtype; not this
        assert all(opt.state[p]["master"].dtype == torch.float32 for p in resumed)
    train(resumed, opt, range(3, 5))
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)


def sparse_model(dtype=torch.float32):
    config = T5Config(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=1, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = SparseT5ForConditionalGeneration(config)
    model.sparsify(0.5, scope="layer")
    return model.to(dtype)


def loss_step(model, opt):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (4, 10), generator=g)
    labels = torch.randint(2, 64, (4, 5), generator=g)
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids.to(model.device), labels=labels.to(model.device)).loss
    loss.backward()
    opt.step()
    return loss.item()


def test_remap_keeps_the_kept_values_moments_when_a_layer_shrinks():
    model = sparse_model(torch.bfloat16)
    opt = make_optimizer(model.parameters(), "adamw8bit", lr=1e-3, bf16_stochastic_round=True)
    loss_step(model, opt)
    layer = next(m for m in model.modules() if isinstance(m, SparseLinear) and m.nnz >= 2 * opt.block_size)
    old_values = layer.values
    before = {k: (v.dequantize() if hasattr(v, "dequantize") and type(v) is not torch.Tensor else v).float()
              for k, v in opt.state[old_values].items() if k in ("exp_avg", "exp_avg_sq")}
    old_tail = {k: opt.state[old_values].get(k + "_tail", torch.empty(0)).float() for k in before}
    old_csr = layer.to_dense().detach().float()
    model.sparsify(0.8, scope="layer", optimizer=opt)
    assert layer.values is not old_values and old_values not in opt.state
    state = opt.state[layer.values]
    assert state["step"].item() == 1
    # The kept weights' positions among the old ones, from the dense views.
    old_positions = (old_csr != 0).flatten().nonzero().flatten()
    new_positions = (layer.to_dense().detach().float() != 0).flatten().nonzero().flatten()
    kept = torch.searchsorted(old_positions, new_positions)
    for key in before:
        whole_old = torch.cat([before[key], old_tail[key]])[kept]
        new = state[key]
        assert type(new) is not torch.Tensor  # quantized again
        whole_new = torch.cat([new.dequantize().float(), state.get(key + "_tail", torch.empty(0)).float()])
        assert whole_new.numel() == layer.nnz
        # requantized in the new blocks: within the 8-bit map's resolution of each block's scale
        assert torch.allclose(whole_new, whole_old, rtol=0.05, atol=1e-3 * whole_old.abs().max().item())
    loss_step(model, opt)  # and the optimizer goes on with the new parameter


def test_remap_refuses_a_foreign_quantized_state():
    """A quantized state of an optimizer that cannot remap it (torchao's own) is refused by name,
    never indexed as if it were one value per element."""
    from sparse_t5.pruning import remap_optimizer_state_

    model = sparse_model()
    layer = next(m for m in model.modules() if isinstance(m, SparseLinear))
    opt = torchao_optim.AdamW8bit(model.parameters(), lr=1e-3)
    opt.state[layer.values] = {"step": torch.tensor(1.0),
                               "exp_avg": torchao_optim.subclass_8bit.OptimState8bit.zeros((layer.nnz,))}
    with pytest.raises(TypeError, match="OptimState8bit.*remap"):
        remap_optimizer_state_(opt, layer.values, torch.nn.Parameter(layer.values[:10].detach()), torch.arange(10))


@pytest.mark.parametrize("make,error,match", [
    (lambda: make_optimizer(params(), "adam8"), ValueError, "one of adamw, adamw8bit, adamw4bit"),
    (lambda: make_optimizer(params(), "adamw", bf16_stochastic_round=True), ValueError, "low-bit"),
    (lambda: make_optimizer(params(), "adamw8bit", bf16_stochastic_round=True, master_weights=True),
     ValueError, "choose"),
    (lambda: make_optimizer(params(), "adamw8bit", foreach=True), ValueError, "foreach"),
])
def test_bad_options_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_fp16_and_integer_parameters_are_refused():
    fp16 = params((5000,), torch.float16)
    opt = make_optimizer(fp16, "adamw8bit")
    set_grads(fp16, 0)
    with pytest.raises(TypeError, match="fp16"):
        opt.step()


def test_a_number_set_as_lr_is_a_clear_error():
    ps = params((5000,))
    opt = make_optimizer(ps, "adamw8bit", lr=1e-3)
    opt.param_groups[0]["lr"] = 1e-4
    set_grads(ps, 0)
    with pytest.raises(RuntimeError, match="fill_"):
        opt.step()


def test_schedulers_set_the_rate_in_place():
    """torch's LR schedulers fill a tensor lr in place (torchao keeps lr a tensor)."""
    ps = params((5000,))
    opt = make_optimizer(ps, "adamw8bit", lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for _ in range(3):
        set_grads(ps, 0)
        opt.step()
        sched.step()
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["lr"].item() == pytest.approx(1.25e-4)


def test_a_bf16_sparse_model_trains_saves_and_reloads_in_bf16(tmp_path):
    bf16_training_round_trip(tmp_path, "cpu")


def bf16_training_round_trip(tmp_path, device):
    """bf16 end to end on our model: values, gradients and the dense parts in bf16, the loss in fp32,
    the checkpoint written in bf16 and loaded back in bf16 ("auto" or asked), to identical logits.
    tests/test_cuda.py runs the same on a GPU."""
    model = sparse_model(torch.bfloat16).to(device).train()
    opt = make_optimizer(model.parameters(), "adamw8bit", lr=3e-3, betas=(0.9, 0.98), bf16_stochastic_round=True)
    losses = [loss_step(model, opt) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)
    ids = torch.randint(2, 64, (2, 7), generator=torch.Generator().manual_seed(5)).to(device)
    out = model(input_ids=ids, labels=ids[:, :3])
    assert out.loss.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(
        out.logits.float().flatten(0, 1), ids[:, :3].flatten()), rtol=0, atol=0)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "BF16" in stored and "F32" not in stored
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids[:, :3]).logits
        for dtype in ("auto", torch.bfloat16):
            reloaded = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "ckpt", dtype=dtype).to(device)
            assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
            assert torch.equal(reloaded(input_ids=ids, decoder_input_ids=ids[:, :3]).logits, logits)


def two_block_model(checkpointing: bool):
    config = T5Config(vocab_size=64, d_model=64, d_kv=16, num_heads=4, d_ff=256, num_layers=2, dropout_rate=0.1,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    model = SparseT5ForConditionalGeneration(config)
    model.sparsify(0.5, scope="layer")
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model.train()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("name", ["adamw", "adamw8bit"])
def test_step_in_backward_is_the_same_update_and_holds_no_gradients(name, checkpointing):
    from sparse_t5.optim import step_in_backward

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 64, (4, 10), generator=g)
    labels = torch.randint(2, 64, (4, 5), generator=g)
    runs = []
    for in_backward in (False, True):
        model = two_block_model(checkpointing)
        opt = make_optimizer(model.parameters(), name, lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        handle = step_in_backward(opt) if in_backward else None
        losses = []
        for step in range(3):
            torch.manual_seed(10 + step)  # the same dropout masks in both runs
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            if in_backward:  # updated and freed during backward: nothing left to step
                assert all(p.grad is None for p in model.parameters())
            opt.step()
            sched.step()
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in model.parameters()], handle))
    (losses_after, params_after, _), (losses_in, params_in, handle) = runs
    assert losses_in == losses_after and losses_in[-1] < losses_in[0]
    for a, b in zip(params_after, params_in):
        torch.testing.assert_close(b, a, rtol=0, atol=0)  # bit for bit: the same update, the same order of math
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < handle.largest_grad_bytes <= largest
    handle.remove()
    torch.manual_seed(10)
    model(input_ids=ids, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # back to step() after backward


def test_step_in_backward_names_a_parameter_the_optimizer_lost():
    from sparse_t5.optim import step_in_backward

    kept, dropped = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([kept, dropped], lr=0.1)
    step_in_backward(opt)
    opt.param_groups[0]["params"] = [kept]  # as when a layer is replaced after the hooks were set
    with pytest.raises(RuntimeError, match="no longer in the optimizer"):
        (kept.sum() + dropped.sum()).backward()
