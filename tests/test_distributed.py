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


def lowbit_rank_main(rank, world, port, name, out):
    """Two 8-bit/4-bit AdamW steps over the shards, then the whole state gathered (full_optimizer_state),
    loaded back into fresh shards and gathered again."""
    from sparse_t5.distributed import full_optimizer_state, full_state_dict, load_full_optimizer_state, shard_model
    from sparse_t5.optim import make_optimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ids, labels = whole_batch()
        half = slice(rank * 2, rank * 2 + 2)

        def sharded(state=None):
            model = make_model("csr")
            if state is not None:
                model.load_state_dict(state)
            model = shard_model(model)
            return model, make_optimizer([p for p in model.parameters() if p.requires_grad], name, lr=1e-3,
                                         block_size=BLOCK)

        model, optimizer = sharded()
        one_step(model, ids[half], labels[half], optimizer)
        # what each rank's shards hold: a quantized prefix, and a tail where the shard is not whole blocks
        layout = {n: (type(optimizer.state[p]["exp_avg"]).__name__, "exp_avg_tail" in optimizer.state[p])
                  for n, p in model.named_parameters() if p in optimizer.state}
        gathered = full_optimizer_state(model, optimizer)
        values = full_state_dict(model)
        if rank == 0:
            torch.save(gathered, os.path.join(out, "gathered.pt"))
        dist.barrier()
        again_model, again = sharded(values)  # a resume: the gathered values and moments
        load_full_optimizer_state(again_model, again, torch.load(os.path.join(out, "gathered.pt"), weights_only=False))
        regathered = full_optimizer_state(again_model, again)
        # each rank's loaded shard against the moments it had: two quantizations apart (whole, shard)
        from sparse_t5.optim import _whole_moments

        # (a shard shorter than a block is kept whole, but the whole parameter may be quantized: the
        # code map's error is the optimizer's, whichever state shows it)
        error = {k: max(code_error(s[k]) for s in optimizer.state.values()) for k in ("exp_avg", "exp_avg_sq")}
        shard_moved = {}
        for (n, p), q in zip(model.named_parameters(), again_model.parameters()):
            if p in optimizer.state:
                had, got = _whole_moments(optimizer.state[p]), _whole_moments(again.state[q])
                shard_moved[n] = {k: ((got[k] - had[k]).abs().max().item(), had[k].abs().max().item(), error[k])
                                  for k in ("exp_avg", "exp_avg_sq")}
        # and the loaded shards step on: a second step from the loaded state equals one from the original
        one_step(model, ids[half], labels[half], optimizer)
        one_step(again_model, ids[half], labels[half], again)
        stepped, stepped_again = full_state_dict(model), full_state_dict(again_model)
        torch.save(dict(layout=layout, values=values, shard_moved=shard_moved, regathered=regathered, stepped=stepped,
                        stepped_again=stepped_again, moment_bytes=sum(local_bytes_of(s) for s in optimizer.state.values())),
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


BLOCK = 32  # the tiny model's shards are a few hundred values: several blocks and a tail each


@pytest.mark.parametrize("name", ["adamw8bit", "adamw4bit"])
def test_fsdp2_low_bit_moments_are_sharded_and_gather_to_one_process_layout(tmp_path, name):
    """Under FSDP2 each rank quantizes its own shard of every moment (prefix blocks and a tail);
    full_optimizer_state gathers them into one process's layout, which loads in one process, and
    loads back into shards. The moments after one step are the exact fp32 ones to within the
    quantization error: half the widest gap of the code map, times the block's largest magnitude,
    once for the shard's blocks and once for the whole parameter's."""
    pytest.importorskip("torchao.optim", reason="make test installs torchao (the lowbit extra)")
    from sparse_t5.optim import _whole_moments, make_optimizer

    mp.spawn(lowbit_rank_main, args=(2, free_port(), name, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=False)
    quantized_type = {"adamw8bit": "OptimState8bit", "adamw4bit": "OptimState4bit"}[name]
    for r in ranks:  # the shards were quantized, with tails, on both ranks
        assert sum(q == quantized_type for q, _ in r["layout"].values()) >= 10, r["layout"]
        assert sum(tail for _, tail in r["layout"].values()) >= 5, r["layout"]

    # The reference: one process, plain fp32 AdamW on the whole batch. The first step's update uses
    # the moments before they are quantized, so the values agree to float rounding.
    model = make_model("csr")
    ids, labels = whole_batch()
    exact = torch.optim.AdamW(model.parameters(), lr=1e-3)
    one_step(model, ids, labels, exact)
    for r in ranks:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(r["values"][key], value, rtol=1e-5, atol=1e-6, msg=key)

    params = list(model.parameters())
    assert sorted(gathered["state"]) == list(range(len(params)))
    for i, p in enumerate(params):
        saved = gathered["state"][i]
        moments = _whole_moments(saved)
        round_trip = _whole_moments(ranks[0]["regathered"]["state"][i])
        for key in ("exp_avg", "exp_avg_sq"):
            reference = exact.state[p][key].reshape(-1)
            assert moments[key].shape == reference.shape, (i, key)
            error = max(code_error(s[key]) for s in gathered["state"].values())  # once in the shard's
            # blocks, once in the whole's (either may keep a short one whole)
            err = (moments[key] - reference).abs().max().item()
            assert err <= 2 * error * reference.abs().max().item() + 1e-7, (i, key, err)
            # into shards again, then whole again: two more quantizations
            err = (round_trip[key] - moments[key]).abs().max().item()
            assert err <= 2 * error * moments[key].abs().max().item() + 1e-7, (i, key, err)
    assert ranks[1]["regathered"] == {}  # gathered to rank 0 only

    # One process loads what the two ranks gathered: its own layout, quantized where it quantizes.
    single = make_optimizer(list(model.parameters()), name, lr=1e-3, block_size=BLOCK)
    single.load_state_dict(gathered)
    assert type(single.state[params[0]]["exp_avg"]).__name__ == quantized_type
    for name in ranks[0]["shard_moved"]:  # each rank's loaded shard holds its own part of the moments
        for key in ("exp_avg", "exp_avg_sq"):
            largest = max(r["shard_moved"][name][key][1] for r in ranks)  # a whole-layout block spans both
            for r in ranks:
                err, _, error = r["shard_moved"][name][key]
                assert err <= 2 * error * largest + 1e-7, (name, key, err, largest)
    # The resumed shards step on as the original ones do. What the extra quantizations move is
    # measured against what low-bit moments move anyway: the original shards' second step against
    # fp32 AdamW's. The resumed moments are two quantizations from the original ones, which are one
    # from fp32's; measured (8-bit): 1.4x.
    one_step(model, ids, labels, exact)
    resume_moved = max((r["stepped_again"][k] - v).abs().max().item()
                       for r in ranks for k, v in r["stepped"].items() if v.is_floating_point())
    low_bit_moved = max((r["stepped"][k] - v).abs().max().item()
                        for r in ranks for k, v in model.state_dict().items() if v.is_floating_point())
    assert 0 < resume_moved <= 2 * low_bit_moved, (resume_moved, low_bit_moved)
    # Each rank holds half of the moments, and a tail of its own per shard.
    single_bytes = sum(local_bytes_of(s) for s in single.state.values())
    for r in ranks:
        assert r["moment_bytes"] <= 0.6 * single_bytes, (r["moment_bytes"], single_bytes)


def code_error(q) -> float:
    """The largest distance from a value in the code map's range ([-1, 1] signed, [0, 1] not) to its
    nearest code: what rounding to nearest moves a value, relative to its block's largest magnitude."""
    codes = q.qmap.float().sort().values if hasattr(q, "qmap") else None
    if codes is None:  # a short parameter's moment, kept whole in its own dtype
        return 0.0
    low = -1.0 if codes[0] < 0 else 0.0
    return max(codes.diff().max().item() / 2, codes[0].item() - low, 1.0 - codes[-1].item())


def local_bytes_of(state):
    """Bytes of a state's moments (codes, scales, tails, master), without the code map: torchao builds a
    256-entry map per state (1 KB for 8 bits), which each rank holds whole and a tiny model notices."""
    def size(t):
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if n != "qmap")
        return t.numel() * t.element_size()

    return sum(size(t) for k, t in state.items() if k != "step" and torch.is_tensor(t))
