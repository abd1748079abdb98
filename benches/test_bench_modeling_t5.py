"""Our T5 at sparsity 0 against HF's T5ForConditionalGeneration: forward and train step, t5-small
shape on CPU (random init, no download). Goal: ours <= 1.1x HF time.

    pytest benches/test_bench_modeling_t5.py
"""
import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from sparse_t5 import SparseT5ForConditionalGeneration

# t5-small: d_model 512, d_ff 2048, 8 heads of 64, 6 + 6 layers, vocab 32128
T5_SMALL = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_heads=8, num_layers=6,
                decoder_start_token_id=0, dropout_rate=0.1)
BATCH, SRC, TGT = 8, 64, 16


def setup_t5(provider, sparsity=0.0):
    torch.manual_seed(0)
    config = T5Config(**T5_SMALL)
    hf = T5ForConditionalGeneration(config)
    if provider == "hf":
        model = hf
    else:
        model = SparseT5ForConditionalGeneration(config)
        model.load_state_dict(hf.state_dict(), strict=False)
        model.tie_weights()
        if sparsity:
            model.sparsify(sparsity, scope="global")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 32128, (BATCH, SRC), generator=g)
    labels = torch.randint(2, 32128, (BATCH, TGT), generator=g)
    return model, ids, labels


@pytest.mark.parametrize("provider", ["hf", "ours"])
def test_t5_small_forward(record, provider):
    model, ids, labels = setup_t5(provider)
    model.eval()

    def run():
        with torch.no_grad():
            model(input_ids=ids, labels=labels, use_cache=False)

    record("t5-small forward (eval, b8 src64 tgt16)", provider, run, rounds=8)


@pytest.mark.parametrize("provider", ["hf", "ours"])
def test_t5_small_train_step(record, provider):
    model, ids, labels = setup_t5(provider)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))

    def run():
        opt.zero_grad()
        model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
        opt.step()

    record("t5-small train step (AdamW, b8 src64 tgt16)", provider, run, rounds=6)


def test_t5_small_train_step_interleaved(record_interleaved):
    """HF and ours timed alternately, step by step, in one process: on a noisy machine this cancels
    the drift that separate pytest-benchmark runs pick up. Records the median time ratio ours / HF."""
    runs = {}
    for provider in ("hf", "ours"):
        model, ids, labels = setup_t5(provider)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98))

        def step(model=model, opt=opt, ids=ids, labels=labels):
            opt.zero_grad()
            model(input_ids=ids, labels=labels, use_cache=False).loss.backward()
            opt.step()

        runs[provider] = step
    medians = record_interleaved("t5-small train step, interleaved (AdamW, b8 src64 tgt16)", runs,
                                 rounds=6, warmup=1)
    ratio = medians["ours"] / medians["hf"]
    print(f"\nt5-small train step, interleaved: ours / HF time = {ratio:.3f} (goal <= 1.1)")
