"""Fine-tuning a sparse model with transformers' own Seq2SeqTrainer (README "Fine-tune with
transformers' Trainer"): AdamW holds moments for the kept values only, checkpoints resume to the
same parameters as an uninterrupted run, without a missing-keys warning for the tied embeddings,
and the saved model reloads with identical logits."""
import logging

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, T5Config

from sparse_t5 import SparseT5ForConditionalGeneration
from sparse_t5.layers import SparseLinear


CONFIG = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, dropout_rate=0.0,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, feed_forward_proj="relu")


def sparse_model():
    torch.manual_seed(0)
    model = SparseT5ForConditionalGeneration(T5Config(**CONFIG))
    model.sparsify(0.8, format="csr", scope="layer")
    return model


def dataset(n=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 64, (n, 10), generator=g)
    labels = torch.randint(2, 64, (n, 4), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(ids, labels)]


def trainer(model, out, **kw):
    args = Seq2SeqTrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, save_strategy="steps",
                                    per_device_train_batch_size=4, learning_rate=1e-2, optim="adamw_torch",
                                    logging_steps=1, report_to=[], use_cpu=True, seed=0, **kw)
    return Seq2SeqTrainer(model=model, args=args, train_dataset=dataset())


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_seq2seq_trainer_trains_saves_resumes_and_reloads(tmp_path):
    model = sparse_model()
    full = trainer(model, tmp_path / "full")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    full.train()
    losses = [h["loss"] for h in full.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))

    # AdamW's moments are held for the kept values only: each sparse layer's state is nnz long.
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert layers
    for layer in layers:
        state = full.optimizer.state[layer.values]
        assert state["exp_avg"].shape == layer.values.shape == (layer.nnz,)
        assert layer.nnz < layer.out_features * layer.in_features * 0.25
        assert not torch.equal(layer.values, before[next(n for n, p in model.named_parameters()
                                                         if p is layer.values)])

    # Resume from the step-3 checkpoint: the same parameters as the uninterrupted run, and no warning
    # about the tied embeddings, which the checkpoint stores once (shared.weight).
    records = Records()
    hf_logger = logging.getLogger("transformers.trainer")
    hf_logger.addHandler(records)
    try:
        resumed_model = sparse_model()
        resumed = trainer(resumed_model, tmp_path / "full")
        resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    finally:
        hf_logger.removeHandler(records)
    assert not [m for m in records.messages if "missing keys" in m or "unexpected keys" in m], records.messages
    for (name, p), q in zip(model.named_parameters(), resumed_model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)

    # The saved model reloads compressed, with identical logits.
    resumed.save_model(str(tmp_path / "final"))
    reloaded = SparseT5ForConditionalGeneration.from_pretrained(str(tmp_path / "final"))
    assert reloaded.sparsity_report()["nnz"] == resumed_model.sparsity_report()["nnz"]
    batch = dataset(2)
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    resumed_model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(resumed_model(input_ids=ids, labels=labels).logits,
                           reloaded(input_ids=ids, labels=labels).logits)


def test_load_state_dict_does_not_report_tied_weights_as_missing():
    """Checkpoints store a tied weight once (shared.weight), as transformers' save does; loading such a
    state dict reports no missing keys, and a truly missing key is still reported."""
    model = sparse_model()
    state = {k: v for k, v in model.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")}
    assert model.load_state_dict(state, strict=True).missing_keys == []
    del state["shared.weight"]  # now the embedding is missing under every name
    missing = model.load_state_dict(state, strict=False).missing_keys
    assert "shared.weight" in missing and "lm_head.weight" in missing


def test_trainer_bf16_and_8bit_optimizers_train_our_model(tmp_path):
    """transformers' `bf16=True` and `optim="adamw_torch_8bit"` (torchao's AdamW8bit) run on our model,
    and so does ours, passed as `optimizers=`, which also quantizes the moments of values
    whose length is not a multiple of 256 (torchao's keeps those in full precision: sparse_t5.optim).
    The model is loaded in bf16, so weights and gradients are bf16; the saved model reloads in bf16
    with identical logits."""
    pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")
    from sparse_t5.optim import make_optimizer

    config = T5Config(**{**CONFIG, "d_model": 64, "d_ff": 512, "d_kv": 16})  # wi/wo: 32768 weights, 3277 kept
    torch.manual_seed(0)
    runs = {}
    for name, extra in (("hf", dict(optim="adamw_torch_8bit")),
                        ("ours", dict(optim="adamw_torch"))):
        torch.manual_seed(0)
        model = SparseT5ForConditionalGeneration(config)
        model.sparsify(0.9, format="csr", scope="layer")
        model.to(torch.bfloat16)
        args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / name), max_steps=8, save_strategy="no",
                                        per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1,
                                        report_to=[], use_cpu=True, seed=0, bf16=True, **extra)
        kwargs = {}
        if name == "ours":  # the Trainer builds its scheduler over it
            kwargs["optimizers"] = (make_optimizer(model.parameters(), "adamw8bit", lr=3e-3,
                                                   bf16_stochastic_round=True), None)
        trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset(), **kwargs)
        try:
            trainer.train()
        except ModuleNotFoundError as err:
            # transformers < 5 builds "adamw_torch_8bit" from torchao.prototype.low_bit_optim, which
            # torchao 0.18 removed (the optimizers are torchao.optim now): HF's string cannot work
            # there, ours (optimizers=) must, and does below.
            assert name == "hf" and "low_bit_optim" in str(err), err
            continue
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses))), losses
        assert min(losses[-3:]) < losses[0], losses
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        odd = [m for m in model.modules() if isinstance(m, SparseLinear) and m.nnz % 256 and m.nnz >= 256]
        assert odd
        quantized = {type(trainer.optimizer.state[m.values]["exp_avg"]).__name__ for m in odd}
        runs[name] = (model, quantized)
    if "hf" in runs:
        assert runs["hf"][1] == {"Tensor"}  # torchao alone: full-precision moments for every odd length
    assert runs["ours"][1] == {"OptimState8bit"}

    model = runs["ours"][0].eval()
    model.save_pretrained(tmp_path / "final")
    reloaded = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "final", dtype="auto").eval()
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    batch = dataset(2)
    ids = torch.stack([b["input_ids"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=labels).logits, reloaded(input_ids=ids, labels=labels).logits)
