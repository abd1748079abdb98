"""Serving a pruned T5 against HF's dense one: forward, greedy and beam search, batch 1 and 32.

    python benches/serving.py [--shape t5-base] [--variants csr:0.5 csr:0.9 2:4] [--rounds 5]

The t5-base shape with random weights (no hub), source 32 tokens, 8 new tokens, in
torch.inference_mode(). Ours is HF's model sparsified at layer scope (`sparsify`), so both hold the
same kept weights. Each round times HF dense and every variant once, in the same process and order;
the table gives each variant's median time over the rounds against HF dense's median.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from sparse_t5 import SparseT5ForConditionalGeneration
from sparse_t5.kernel_policy import load_table, table_info
from sparse_t5.modeling_t5 import LMHead

SHAPES = {
    "t5-small": dict(d_model=512, d_ff=2048, num_heads=8, d_kv=64, num_layers=6),
    "t5-base": dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=12),
}


def build(shape: str, variants: list[str]):
    torch.manual_seed(0)
    config = T5Config(vocab_size=32128, **SHAPES[shape], decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      feed_forward_proj="relu")
    hf = T5ForConditionalGeneration(config).eval()
    models = {"HF dense": hf}
    for v in variants:
        ours = SparseT5ForConditionalGeneration(copy.deepcopy(config))  # sparsify records its layout in the config
        ours.load_state_dict(hf.state_dict())
        if v == "2:4":
            ours.sparsify(format="2:4")
        else:
            ours.sparsify(float(v.split(":")[1]), format="csr", scope="layer")
        models[v] = ours.eval()
    return models


def workloads(batch: int, source: int, new: int):
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(2, 32128, (batch, source), generator=g)
    labels = torch.randint(2, 32128, (batch, new), generator=g)
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return {
        "forward": lambda m: m(input_ids=ids, labels=labels),
        "greedy": lambda m: m.generate(input_ids=ids, num_beams=1, **gen),
        "beam 10": lambda m: m.generate(input_ids=ids, num_beams=10, **gen),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="t5-base", choices=sorted(SHAPES))
    p.add_argument("--variants", nargs="+", default=["csr:0.5", "csr:0.9", "2:4"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--source", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--lm-head-op", choices=["on", "off"], default="on",
                   help="off: our lm_head runs F.linear at every token count (LMHead.few_tokens = {}), to compare")
    p.add_argument("--lm-head-slices", choices=["on", "off"], default="on",
                   help="off: our fp32 lm_head runs one F.linear above the op's range, not F.linear over slices of "
                        "the weight (LMHead.chunked_tokens = {}), to compare")
    p.add_argument("--table", default=None,
                   help="a kernel method table file the auto policy uses (default: this machine's tuned table, "
                        "else the committed one), e.g. one `sparse-t5 tune --out` wrote")
    p.add_argument("--csr-few-tokens", type=int, default=None,
                   help="calls of up to this many tokens take the CSR few-token path (default: the built-in; 0: off)")
    a = p.parse_args(argv)
    info = load_table("cpu", a.table) if a.table else table_info("cpu")
    if a.csr_few_tokens is not None:
        torch.ops.sparse_t5.set_csr_few_tokens(a.csr_few_tokens)
    if a.lm_head_op == "off":
        LMHead.few_tokens = {}
    if a.lm_head_slices == "off":
        LMHead.chunked_tokens = {}
    models = build(a.shape, a.variants)
    print(f"{a.shape}, random weights, source {a.source}, {a.new_tokens} new tokens, inference mode, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, kernels {torch.ops.sparse_t5.cpu_isa()}, "
          f"CSR few-token path up to {torch.ops.sparse_t5.get_csr_few_tokens()} tokens, lm_head few-token op {a.lm_head_op}, "
          f"slices {a.lm_head_slices}; method table {info['source']} ({info['path']}); "
          f"median of {a.rounds} rounds; time against HF dense\n")
    print("| batch | run | HF dense | " + " | ".join(a.variants) + " |")
    print("|---|---|---|" + "---|" * len(a.variants))
    with torch.inference_mode():
        for batch in a.batches:
            for name, work in workloads(batch, a.source, a.new_tokens).items():
                times = {k: [] for k in models}
                for m in models.values():  # warm-up
                    work(m)
                for _ in range(a.rounds):
                    for k, m in models.items():
                        t0 = time.perf_counter()
                        work(m)
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in times.items()}
                dense = med["HF dense"]
                print(f"| {batch} | {name} | {dense * 1e3:.0f} ms | " +
                      " | ".join(f"{med[v] / dense:.2f}x" for v in a.variants) + " |", flush=True)


if __name__ == "__main__":
    main()
