"""Per-rank training state under FSDP2 (sparse_t5.distributed.shard_model), at real widths, on CPU/gloo.

    python benches/fsdp_state.py [--shape t5-3b] [--layers 2] [--world 2]

A model of `shape`'s widths with `layers` encoder and decoder blocks (the per-block ratio is what
matters: every block but each stack's first is sharded alike) is pruned (CSR 0.9 global, and 2:4),
trained one AdamW step in one process and in `world` gloo processes (each on its share of the batch),
and each rank's bytes of parameters, gradients, AdamW moments and index are compared with the
single process's: with the index replicated and with it sharded (shard_index), for the whole model
and for the sparse layers alone; and, index sharded, in bf16 with 8-bit AdamW (each rank quantizes
its own shards' moments in its own blocks: sparse_t5/optim.py) against one process in bf16 + 8-bit (the dense embeddings, sharded alike, pull the whole toward 0.5 in a
shallow model). Prints one JSON object. These are the bytes held between steps; every unit is sharded then, the root (embeddings,
block 0 of each stack) included, so the depth does not change the ratio. During the step a unit's
gathered parameters come on top (the root's for the whole forward and backward).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # recovery_step.config_for


LOW_BIT = "bf16-adamw8bit"  # the variant's key suffix: bf16 weights, 8-bit moments, stochastic rounding


def build(shape, layers, fmt, low_bit=False):
    from recovery_step import config_for

    from sparse_t5 import SparseT5ForConditionalGeneration

    config = config_for(shape)
    config.num_layers = config.num_decoder_layers = layers
    torch.manual_seed(0)
    model = SparseT5ForConditionalGeneration(config)
    model.sparsify(**({"format": "2:4"} if fmt == "2:4" else {"sparsity": 0.9, "scope": "global"}))
    return (model.to(torch.bfloat16) if low_bit else model).train()


def batch(vocab, world, rank):
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(2, vocab, (8, 32), generator=g), torch.randint(2, vocab, (8, 8), generator=g)
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    return ids[share], labels[share]


def step_state(model, rank=0, world=1, low_bit=False):
    from sparse_t5.distributed import local_state_bytes
    from sparse_t5.optim import make_optimizer

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = (make_optimizer(params, "adamw8bit", lr=1e-4, bf16_stochastic_round=True) if low_bit
                 else torch.optim.AdamW(params, lr=1e-4))
    ids, labels = batch(model.config.vocab_size, world, rank)
    model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    return {"all": local_state_bytes(model, optimizer),
            "sparse_layers": local_state_bytes(model, optimizer, sparse_layers_only=True)}


def rank_main(rank, world, port, args, out):
    from sparse_t5.distributed import shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = {}
        for fmt in ("csr", "2:4"):
            for shard_index in (False, True):
                model = shard_model(build(args.shape, args.layers, fmt), shard_index=shard_index)
                result[f"{fmt}/{'sharded' if shard_index else 'replicated'}"] = step_state(model, rank, world)
                del model
            model = shard_model(build(args.shape, args.layers, fmt, low_bit=True))
            result[f"{fmt}/sharded/{LOW_BIT}"] = step_state(model, rank, world, low_bit=True)
            del model
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="t5-3b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    single = {fmt: step_state(build(args.shape, args.layers, fmt)) for fmt in ("csr", "2:4")}
    single.update({f"{fmt}/{LOW_BIT}": step_state(build(args.shape, args.layers, fmt, low_bit=True), low_bit=True)
                   for fmt in ("csr", "2:4")})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_main, args=(args.world, port, args, out), nprocs=args.world, join=True)
        ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(args.world)]
    result = {"shape": args.shape, "layers": args.layers, "world": args.world, "single_process_bytes": single}
    for key in ranks[0]:
        fmt = key.split("/")[0] + (f"/{LOW_BIT}" if key.endswith(LOW_BIT) else "")
        result[key] = {"rank_bytes": [r[key] for r in ranks]}
        for part in ("all", "sparse_layers"):  # the largest rank's share of one process's bytes
            result[key][f"max_rank_ratio_{part}"] = max(r[key][part] for r in ranks) / single[fmt][part]
    json.dump(result, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
