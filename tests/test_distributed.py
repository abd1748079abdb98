"""FSDP2 on the sparse model (sparse_t5/distributed.py), on CPU with gloo in two processes.

One training step sharded over two ranks (each on half of the batch) gives the gradients and, after
SGD, the values of one process on the whole batch; each rank holds half of every parameter, its
gradient and its AdamW state, and half of the index (shard_index=True, the default) or all of it.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import T5Config

from sparse_t5 import SparseT5ForConditionalGeneration

CONFIG = dict(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=3,
              dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
              decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def make_model(fmt):
    torch.manual_seed(0)
    model = SparseT5ForConditionalGeneration(T5Config(**CONFIG))
    model.sparsify(**({"format": "2:4"} if fmt == "2:4" else {"sparsity": 0.8}))
    if fmt == "csr-with-an-empty-layer":  # as global scope leaves q projections at high sparsity
        model.sparsify(0.9999, include=r"encoder\.block\.1\.layer\.0\.SelfAttention\.q$")
        assert model.encoder.block[1].layer[0].SelfAttention.q.nnz == 0
    return model.train()


def whole_batch():
    g = torch.Generator().manual_seed(1)
    # no padding or ignored labels: each rank's mean loss has as many tokens, so their average is the
    # whole batch's mean and the averaged gradients are the whole batch's
    return torch.randint(2, 64, (4, 7), generator=g), torch.randint(2, 64, (4, 5), generator=g)


def one_step(model, ids, labels, optimizer):
    optimizer.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    optimizer.step()
    return grads


def rank_main(rank, world, port, fmt, shard_index, out):
    from sparse_t5.distributed import full_state_dict, local_state_bytes, shard_model
    from torch.distributed.tensor import DTensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = shard_model(make_model(fmt), shard_index=shard_index)
        ids, labels = whole_batch()
        half = slice(rank * 2, rank * 2 + 2)
        trainable = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
        grads = one_step(model, ids[half], labels[half], torch.optim.SGD(trainable(model), lr=0.1))
        full_grads = {n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items() if g is not None}
        values = full_state_dict(model)
        # AdamW state, sharded as its parameters are
        adam = shard_model(make_model(fmt), shard_index=shard_index)
        optimizer = torch.optim.AdamW(trainable(adam), lr=1e-3)
        one_step(adam, ids[half], labels[half], optimizer)
        local = {n: p.to_local().numel() for n, p in adam.named_parameters() if isinstance(p, DTensor)}
        torch.save(dict(grads=full_grads, values=values, local_numel=local,
                        state_bytes=local_state_bytes(adam, optimizer)), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("shard_index", [True, False], ids=["index-sharded", "index-replicated"])
@pytest.mark.parametrize("fmt", ["csr", "2:4", "csr-with-an-empty-layer"])
def test_fsdp2_two_ranks_equal_one_process_with_half_the_state(tmp_path, fmt, shard_index):
    from sparse_t5.distributed import local_state_bytes

    mp.spawn(rank_main, args=(2, free_port(), fmt, shard_index, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = make_model(fmt)
    ids, labels = whole_batch()
    grads = one_step(model, ids, labels, torch.optim.SGD(model.parameters(), lr=0.1))
    for r in ranks:
        assert set(r["grads"]) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        for name, value in model.state_dict().items():  # values after SGD, and the index buffers, whole
            torch.testing.assert_close(r["values"][name], value, rtol=1e-5, atol=1e-6, msg=name)

    adam = make_model(fmt)
    optimizer = torch.optim.AdamW(adam.parameters(), lr=1e-3)
    one_step(adam, ids, labels, optimizer)
    sizes = {name: t.numel() for name, t in adam.state_dict().items()}
    sharded = set(ranks[0]["local_numel"])
    index_names = {name for name, b in adam.named_buffers() if b.numel()}
    expected = {n for n in sizes if n.endswith(".values") and sizes[n]} | (index_names if shard_index else set())
    assert expected <= sharded and not (index_names & sharded if not shard_index else set())
    for name in sharded:  # split in two, nothing lost or repeated
        counts = [r["local_numel"][name] for r in ranks]
        assert sum(counts) == sizes[name] and max(counts) == (sizes[name] + 1) // 2, name
    whole = local_state_bytes(adam, optimizer)
    index = sum(b.numel() * b.element_size() for b in adam.buffers())
    per_rank = (whole - index) / 2 + (index / 2 if shard_index else index)
    for r in ranks:  # half of parameters, gradients and moments (to a row of padding), the index half or whole
        assert abs(r["state_bytes"] - per_rank) <= 0.01 * whole, (r["state_bytes"], per_rank, whole)
