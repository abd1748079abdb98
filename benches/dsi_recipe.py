"""Measure one DSI training recipe on the embedded dataset: validation metrics per epoch, test metrics
at the end, and the wall time. This is how the demo's defaults were chosen (README "DSI demo").

    python benches/dsi_recipe.py --epochs 30 --pseudo-queries 20 --docids atomic --model-size tiny

Prints one JSON line per epoch and a final JSON line with the test metrics and seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from sparse_t5.dsi.data import build_lee_dataset, load, load_or_train_tokenizer, split_queries
from sparse_t5.dsi.docids import build_docids
from sparse_t5.dsi.examples import ResampledExamples, make_examples
from sparse_t5.dsi.pipeline import MODEL_SIZES, RunConfig, evaluate_model, new_model
from sparse_t5.dsi.trainer import Trainer, TrainConfig


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="constant", choices=["constant", "linear"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="warm-up as a fraction of all steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--model-size", default="tiny", choices=sorted(MODEL_SIZES))
    p.add_argument("--docids", default="atomic")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--encoder", default=None, help="encoder for semantic docids (default: LSA)")
    p.add_argument("--pseudo-queries", type=int, default=10)
    p.add_argument("--index-tokens", type=int, default=64)
    p.add_argument("--index-stride", type=int, default=None)
    p.add_argument("--index-ratio", type=float, default=1.0)
    p.add_argument("--fixed-pseudo-queries", action="store_true",
                   help="one draw of pseudo-queries for every epoch (default: a fresh draw each epoch)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = tempfile.mkdtemp(prefix="dsi-recipe-")
    paths = build_lee_dataset(os.path.join(root, "data"), seed=a.seed)
    data = load(paths["corpus"], paths["queries"], paths["qrels"])
    splits = split_queries(list(data.queries), seed=a.seed)
    tok = load_or_train_tokenizer(None, [d.contents for d in data.corpus] + [data.queries[q] for q in splits["train"]],
                                  os.path.join(root, "tok"))
    t0 = time.perf_counter()
    mapping = build_docids(a.docids, data.corpus, tok, seed=a.seed, encoder=a.encoder)
    docid_seconds = time.perf_counter() - t0
    cfg = RunConfig(model_size=a.model_size, dropout=a.dropout, seed=a.seed)
    model = new_model(cfg, tok)
    labels = [(q, d) for q in splits["train"] for d in data.qrels[q]]
    examples = ResampledExamples(
        lambda draw: make_examples(data.corpus, {q: data.queries[q] for q in splits["train"]}, labels, tok,
                                   a.index_tokens, a.index_ratio, a.seed, index_stride=a.index_stride,
                                   pseudo_queries=a.pseudo_queries, draw=draw),
        resample=not a.fixed_pseudo_queries)
    # eval_every=1: validate() below decides which epochs decode
    tc = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, schedule=a.schedule,
                     warmup_steps=a.warmup_steps, warmup_ratio=a.warmup_ratio, index_tokens=a.index_tokens,
                     seed=a.seed, device="cpu", eval_every=1)
    val = splits["validation"]
    epoch_box = {"n": 0}

    def validate(m):
        epoch_box["n"] += 1
        if epoch_box["n"] % a.eval_every and epoch_box["n"] != a.epochs:
            return {}
        r = evaluate_model(m, tok, mapping, data, val, None, 10, 0, rescore_too=False)
        return {k: r[k] for k in ("Hits@1", "Hits@10", "MRR@10")}

    trainer = Trainer(model, tok, mapping, examples, tc, os.path.join(root, "run"), validate,
                      log=lambda s: print(s, file=sys.stderr, flush=True), progress=False)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    test = evaluate_model(model, tok, mapping, data, splits["test"], None, 10, 0, rescore_too=False)
    print(json.dumps({"args": vars(a), "examples": len(examples), "steps": trainer.state["global_step"],
                      "train_seconds": round(seconds, 1), "docid_seconds": round(docid_seconds, 1),
                      "test": {k: round(test[k], 4) for k in ("Hits@1", "Hits@10", "MRR@10")}}), flush=True)


if __name__ == "__main__":
    main()
