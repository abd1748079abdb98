"""Several processes: joining torchrun's process group (init_distributed, which the CLI calls), and
sharding a sparse T5 across them with FSDP2 (torch.distributed.fsdp.fully_shard).

Each T5 block but each stack's first is its own FSDP unit and the model is the root (why block 0 is
not: below). A sparse layer's `values` is an ordinary parameter, so FSDP2 shards it (and its
gradient and AdamW state) along its only dimension.

The CSR/2:4 index (row_ptr and col_idx, or meta) is a buffer, which FSDP2 would leave whole on every
rank: about 2 B per kept weight against the 16 B of values, gradient and AdamW's two moments (t5-3b
at 0.9, measured: 571 MB of index for 281.9M kept weights). Replicated, each of two ranks holds
(8 + 2) / 18 = 0.56 of one process's sparse-layer state (measured 0.553 at t5-3b's widths). So by
default (`shard_index=True`) the index becomes a frozen parameter (requires_grad=False) and is
sharded and gathered with the values: 9 / 18 = 0.5 per rank, for 2 B more per kept weight in each
all-gather (the values are 4 B; nothing more is reduce-scattered, since the index has no gradient).
`shard_index=False` keeps it replicated: less communication, more memory.

One T5 detail: the stack computes the relative position bias from block 0's attention *before*
running block 0, while FSDP2 gathers a unit's parameters only for that unit's own forward (sharding
block 0 on its own fails: "aten.embedding.default got mixed torch.Tensor and DTensor"). Leaving the
bias table out of block 0's unit with `ignored_params` leaves it out of every unit: its gradient is
then never averaged across ranks (tests/test_distributed.py caught that). So each stack's block 0
(the block that owns the bias table) is not a unit of its own: it belongs to the root, gathered for
the whole forward, which costs one block of each stack (1/24 of t5-3b or t5-11b) whole on each rank
during the step.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .devices import resolve_device


def shard_model(model, mesh=None, shard_index: bool = True, **fsdp_kwargs):
    """fully_shard every encoder and decoder block but each stack's first, then the model (in place;
    returns it).

    `shard_index`: shard the sparse layers' index with their values (see the module's docstring);
    it then shows in model.parameters() as frozen integer parameters, which optimizers skip (no grad).

    `mesh`: a 1-D DeviceMesh (default: all ranks of the default process group, on the model's device
    type). Extra keyword arguments go to every fully_shard call (e.g. mp_policy, reshard_after_forward).
    After it, the model's parameters are DTensors: build the optimizer afterwards, and save with
    `full_state_dict(model)` gathered to ordinary tensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not torch.distributed.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialised (torchrun, or init_process_group)")
    if mesh is None:
        mesh = init_device_mesh(model.device.type, (torch.distributed.get_world_size(),))
    if shard_index:
        from .layers import SparseLinear

        for layer in model.modules():
            if isinstance(layer, SparseLinear):
                for key in layer._structure_keys():  # the same name, so state_dict keys do not change
                    if layer._buffers[key].numel():
                        layer.register_parameter(key, torch.nn.Parameter(layer._buffers.pop(key), requires_grad=False))
    # A layer pruned to nothing (global scope empties whole q projections at high sparsity) has empty
    # values, and FSDP2's reduce-scatter fails on an empty gradient ("_chunk_cat expects non-empty
    # tensor"). Such a parameter holds no state to shard: FSDP2 leaves it alone.
    empty = {p for p in model.parameters() if p.numel() == 0}
    if empty:
        fsdp_kwargs["ignored_params"] = set(fsdp_kwargs.get("ignored_params") or ()) | empty
    for block in list(model.encoder.block) + list(model.decoder.block):
        if not any("relative_attention_bias" in name for name, _ in block.named_parameters()):
            fully_shard(block, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)  # the rest, block 0 of each stack included
    return model


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state with every sharded parameter gathered (collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    def whole(t):
        if not isinstance(t, DTensor):
            return t
        if t.dtype in (torch.int16, torch.uint16):  # a sharded col_idx: neither gloo nor NCCL all-gathers 16-bit ints
            return t.to(torch.int32).full_tensor().to(t.dtype)
        return t.full_tensor()

    return {name: whole(t).detach() for name, t in model.state_dict().items()}


def local_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` held by this rank: its shard if FSDP2 sharded it (a DTensor), else all of it; a
    quantized optimizer state counts its codes and scales, not its logical size."""
    from .optim import tensor_bytes

    return tensor_bytes(t.to_local() if hasattr(t, "to_local") else t)


def local_state_bytes(model, optimizer=None, sparse_layers_only: bool = False) -> int:
    """Bytes this rank holds of parameters, their gradients, optimizer state and buffers (shards, for
    sharded tensors); `sparse_layers_only`: of the sparse layers' alone (values, index, their
    gradients and moments), without the dense embeddings and norms."""
    from .layers import SparseLinear

    owners = [m for m in model.modules() if isinstance(m, SparseLinear)] if sparse_layers_only else [model]
    seen, total = set(), 0
    for owner in owners:
        for p in owner.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0)
            if optimizer is not None:
                total += sum(local_bytes(s) for s in optimizer.state.get(p, {}).values() if torch.is_tensor(s) and s.dim())
        for b in owner.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                total += local_bytes(b)
    return total


def is_sharded(model) -> bool:
    """Whether `model` has been through fully_shard (its class is then an FSDPModule)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2 cannot have sharded it
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model):
    """Inside, a sharded model's root unit (embeddings, each stack's block 0, final layer norms, lm_head)
    stays gathered, so code that runs parts of the model outside the root's forward works: `generate`
    runs the encoder before its first forward call. The other blocks gather themselves in their own
    forward as usual. Collective: every rank must enter it and run the same forwards inside. A no-op on
    an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def _trainable_names(model) -> list[str]:
    # The order of model.parameters() (tied parameters once), which is the order the optimizer was
    # built in (the trainer passes the trainable ones in that order).
    return [name for name, p in model.named_parameters() if p.requires_grad]


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's state_dict, whole and on the CPU, in torch's own layout (parameters numbered in
    the order of model.parameters()), so that a checkpoint written by a sharded run loads in a single
    process and the reverse. Collective when the model is sharded (torch.distributed.checkpoint gathers
    the shards to rank 0; the other ranks get {})."""
    if not is_sharded(model):
        return optimizer.state_dict()
    if hasattr(optimizer, "full_state_dict"):  # the low-bit optimizers: shard-local blocks (sparse_t5/optim.py)
        return optimizer.full_state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer,
                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not by_name:  # cpu_offload gathers to rank 0 only; the other ranks get {}
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    """Load what `full_optimizer_state` returned (or any optimizer.state_dict() of the same model) into
    `optimizer`; on a sharded model each rank keeps its shard of every moment. Collective when sharded."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    if hasattr(optimizer, "load_full_state_dict"):
        optimizer.load_full_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def init_distributed(device_spec: str = "auto") -> torch.device:
    """Under torchrun (WORLD_SIZE > 1), join the process group: nccl when this rank runs on a GPU
    (cuda:LOCAL_RANK), gloo on CPU. Returns this process's device; a no-op outside torchrun."""
    device = resolve_device(device_spec)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device
