"""Optimizers for recovery fine-tuning, chosen by name: `make_optimizer(params, "adamw8bit", ...)`.

    adamw       torch.optim.AdamW: two fp32 moments, 8 B per weight.
    adamw8bit   torchao's AdamW8bit: both moments in 8 bits with one fp32 scale per 256 values, ~2.03 B.
    adamw4bit   torchao's AdamW4bit: 4 bits, one scale per 128 values, ~1.06 B.

A sparse layer's `values` is a 1-D parameter of any length (its nnz). torchao quantizes a state only
when its parameter's length is a multiple of the block size and at least 4096; any other parameter
silently keeps full-precision moments. At 0.9, pruned per layer, almost no layer's nnz is a multiple
of 256, so torchao's AdamW8bit holds about as many bytes of moments per kept weight as plain AdamW
(tests/test_optim.py measures both). The low-bit optimizers here are torchao's with two changes:
- the first nnz - nnz % block_size values of a parameter get the quantized moments (a prefix view,
  updated by torchao's own compiled `single_param_adam`); the tail (fewer than block_size values)
  keeps moments in the parameter's dtype, as torchao keeps a short parameter's;
- a parameter is quantized from one full block on (`min_quantized_size`, default block_size), not
  from 4096 values: a small model's pruned layers are short (the DSI demo's largest keeps 819 values
  at 0.9), and at 4096 none of them would be quantized, so the demo could not show what 8-bit
  moments do to recovery. Norm weights of d_model >= block_size are quantized too.
Everything else is torchao's: its quantization, its update, its state subclasses.

Under FSDP2 a parameter is a DTensor and each rank holds a shard of it (torch.chunk's split of the
first dimension). Each rank keeps its shard's moments in the same layout as above, over the shard:
its own block-aligned prefix and tail, as plain local tensors, updated in place through to_local()
(the storage FSDP2 all-gathers from). So each rank holds about 1/world of the moments, plus one
tail per shard. torchao's own sharding quantizes a shard only when its length is a multiple of the
block size. A shard's blocks do not line up with the whole parameter's, so a checkpoint is not the
ranks' codes side by side: `full_state_dict()` dequantizes each shard's moments, all-gathers them
and quantizes them again over the whole parameter (one process's layout, which resumes anywhere), and
`load_full_state_dict()` does the reverse on each rank. Each crossing rounds every value once more,
by at most half a code gap of its block (tests/test_distributed.py bounds it).

bf16 weights without an fp32 copy need their updates rounded stochastically (`bf16_stochastic_round`,
torchao's `_fp32_to_bf16_sr`), or an update smaller than half a bf16 ulp is lost. `master_weights`
keeps an fp32 copy instead (4 B per weight more). The DSI trainer's choice and its measurement: README,
"Bigger models".

Updating in backward: `step_in_backward(optimizer)` steps each parameter as soon as its gradient is
complete (torch's post-accumulate-grad hook, as in PyTorch's "optimizer step in backward" recipe) and
frees that gradient, so the model never holds all its gradients at once: 2 B per kept weight less in
bf16, 4 in fp32. The update is the same as step() after backward; what needs every gradient at once
(clipping by the global norm, accumulation over micro-batches, DDP's all-reduce) cannot be used with it.

Compilation: torchao compiles the update per parameter shape (`dynamic=False`); a new length costs
~0.2 s once (measured here), so a model pruned per layer compiles a handful of shapes and one pruned
globally one per layer, on its first step.
"""
from __future__ import annotations

import functools

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")


def make_optimizer(params, name: str = "adamw", lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0, bf16_stochastic_round: bool = False, master_weights: bool = False,
                   block_size: int | None = None, **adamw_kwargs) -> torch.optim.Optimizer:
    """The optimizer called `name` (OPTIMIZERS) over `params`. `bf16_stochastic_round` and
    `master_weights` apply to the low-bit ones only (a bf16 parameter's update; see the module's
    docstring); extra keyword arguments go to torch.optim.AdamW (foreach, fused)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        if bf16_stochastic_round or master_weights:
            raise ValueError("bf16_stochastic_round and master_weights are options of the low-bit optimizers "
                             "(adamw8bit, adamw4bit); torch's AdamW updates a bf16 weight in bf16")
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **adamw_kwargs)
    if adamw_kwargs:
        raise ValueError(f"{name} takes no {sorted(adamw_kwargs)} (torch.optim.AdamW's options)")
    if bf16_stochastic_round and master_weights:
        raise ValueError("choose bf16_stochastic_round or master_weights: both are ways to keep small updates "
                         "of a bf16 weight")
    cls = low_bit_adamw(name)
    kwargs = {} if block_size is None else {"block_size": block_size}
    return cls(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
               bf16_stochastic_round=bf16_stochastic_round, master_weights=master_weights, **kwargs)


def _torchao_optim():
    try:
        import torchao.optim
    except ImportError as e:  # the extra: pip install -e '.[lowbit]'
        raise ImportError("the 8-bit and 4-bit optimizers are torchao's: pip install 'sparse-t5[lowbit]' "
                          "(torchao >= 0.18)") from e
    return torchao.optim


@functools.cache
def low_bit_adamw(name: str) -> type:
    """The class behind make_optimizer(name=...) for adamw8bit/adamw4bit: a subclass of torchao's
    AdamW8bit/AdamW4bit (built on first use, so importing sparse_t5 does not import torchao)."""
    ao = _torchao_optim()
    from torchao.optim.adam import single_param_adam

    base = {"adamw8bit": ao.AdamW8bit, "adamw4bit": ao.AdamW4bit}[name]

    class BlockAlignedAdamW(base):
        __doc__ = f"""torchao's {base.__name__}, quantizing the block-aligned prefix of every parameter
        whatever its length (sparse_t5.optim's docstring). State per parameter: step, exp_avg and
        exp_avg_sq (quantized, over the prefix; in the parameter's dtype and whole when it is shorter
        than min_quantized_size), exp_avg_tail and exp_avg_sq_tail (the rest, in the parameter's dtype),
        and master (fp32) with master_weights."""

        def __init__(self, params, *args, master_weights: bool = False, min_quantized_size: int | None = None,
                     **kwargs):
            super().__init__(params, *args, **kwargs)
            self.master_weights = master_weights
            self.min_quantized_size = self.block_size if min_quantized_size is None else min_quantized_size
            # torch's load_state_dict casts every floating state to its parameter's dtype, which would
            # round an fp32 master copy to bf16: set the masters aside before, and back after.
            self._masters_loading = []
            self.register_load_state_dict_pre_hook(_set_masters_aside)
            self.register_load_state_dict_post_hook(_restore_masters)

        def _quantized_length(self, p: torch.Tensor) -> int:
            head = p.numel() - p.numel() % self.block_size
            return head if head >= max(self.min_quantized_size, self.block_size) else 0

        def _init_state(self, p: torch.Tensor, state: dict) -> None:
            p = _local(p)  # under FSDP2, this rank's shard: its own prefix and tail (the module's docstring)
            if not p.is_floating_point():
                raise TypeError(f"{name} updates floating-point parameters only, got one of dtype {p.dtype} "
                                f"(shape {tuple(p.shape)})")
            if p.dtype == torch.float16:
                raise TypeError(f"{name} on an fp16 parameter (shape {tuple(p.shape)}): torchao's update and its "
                                "stochastic rounding are for fp32 and bf16; train in bf16 or fp32")
            head = self._quantized_length(p)
            flat = p.detach().reshape(-1)
            state["step"] = torch.tensor(0.0)
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if head:
                    state[key] = self._subclass_zeros(flat[:head], signed, self.block_size)
                    if head < p.numel():
                        state[key + "_tail"] = torch.zeros_like(flat[head:])
                else:
                    state[key] = torch.zeros_like(flat)
            if self.master_weights:
                state["master"] = flat.float().clone()

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            update = _compiled(single_param_adam)  # built once: step_in_backward calls step() per parameter
            # One compiled update per parameter length (see the module's docstring), so no cache limit.
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    if not isinstance(group["lr"], torch.Tensor):
                        raise RuntimeError("lr was set to a number; set it with param_groups[i]['lr'].fill_(value) "
                                           "(torchao keeps it a tensor so that a new rate does not recompile)")
                    for p in group["params"]:
                        if p.grad is None:
                            continue
                        if p.grad.is_sparse:
                            raise RuntimeError(f"{name} does not take sparse gradients")
                        state = self.state[p]
                        if not state:
                            self._init_state(p, state)
                        state["step"] += 1
                        local = _local(p)
                        if not local.is_contiguous():
                            raise RuntimeError(f"{name} needs contiguous parameters, got one of shape {tuple(p.shape)} "
                                               f"and strides {local.stride()}")
                        target = state["master"] if self.master_weights else local.detach().view(-1)
                        grad = _local(p.grad).reshape(-1)
                        sr = self.bf16_stochastic_round and p.dtype == torch.bfloat16 and not self.master_weights
                        args = (group["lr"], group["betas"][0], group["betas"][1], group["weight_decay"],
                                group["eps"], self.is_adamw, sr)
                        head = state["exp_avg"].numel() if _is_quantized(state["exp_avg"]) else 0
                        if head:
                            update(target[:head], grad[:head], state["step"], state["exp_avg"],
                                   state["exp_avg_sq"], None, *args)
                        if head < local.numel():  # a short parameter, or the tail: eager, a few hundred values
                            single_param_adam(target[head:], grad[head:], state["step"],
                                              state.get("exp_avg_tail", state["exp_avg"]),
                                              state.get("exp_avg_sq_tail", state["exp_avg_sq"]), None, *args)
                        if self.master_weights:
                            local.detach().reshape(-1).copy_(target)  # round to nearest into the bf16 weight
            return loss

        def remap_state(self, old: torch.Tensor, new: torch.Tensor, kept: torch.Tensor) -> None:
            """After a layer shrank (`new` = old.flatten()[kept], sparsify's optimizer=), keep the moments
            of the kept values: dequantized, gathered, quantized again in `new`'s own layout."""
            state = self.state.pop(old, None)
            if not state:
                return
            moments = {key: m[kept] for key, m in _whole_moments(state).items()}
            self.state[new] = self._state_from_moments(new, moments, state["step"])

        def _state_from_moments(self, p: torch.Tensor, moments: dict, step: torch.Tensor) -> dict:
            """A state for `p` (or its shard) in its own layout, holding `moments` (whole, fp32, as
            _whole_moments gives them)."""
            state = {}
            self._init_state(p, state)
            state["step"] = step.clone()
            for key in ("exp_avg", "exp_avg_sq"):
                whole = moments[key]
                if whole.numel() != _local(p).numel():
                    raise ValueError(f"optimizer state {key!r} holds {whole.numel()} values for a parameter "
                                     f"(or shard) of {_local(p).numel()}: the state is not this model's")
                head = state[key].numel() if _is_quantized(state[key]) else 0
                if head:
                    state[key].copy_(whole[:head].to(_local(p).dtype))
                    if key + "_tail" in state:
                        state[key + "_tail"].copy_(whole[head:])
                else:
                    state[key].copy_(whole)
            if "master" in moments:  # without master_weights, load_state_dict refuses it with a clear message
                state["master"] = moments["master"].float().clone()
            return state

        def full_state_dict(self) -> dict:
            """state_dict() in one process's layout, from a run whose parameters are FSDP2 shards
            (DTensors). Each rank quantizes its own shard in its own blocks, which do not line up with
            the whole parameter's, so every moment is dequantized, all-gathered and quantized again
            over the whole parameter: a sharded run's checkpoint then resumes in one process (or on
            another number of ranks) and the reverse. That second quantization moves a value by at most
            half a code step of its block (tests/test_distributed.py bounds it). Collective: call on
            every rank; rank 0 gets the state on the CPU, the others {}."""
            from torch.distributed.tensor import DTensor

            rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
            packed = self.state_dict()  # its param_groups (hyperparameters, parameter numbering); state is local
            params = [p for group in self.param_groups for p in group["params"]]
            whole = {}
            for i, p in enumerate(params):
                state = self.state.get(p)
                if not state:
                    continue
                moments = _whole_moments(state)
                if isinstance(p, DTensor):  # uneven shards: from_local with the whole shape pads and trims
                    moments = {key: DTensor.from_local(m.reshape(_local(p).shape), p.device_mesh, p.placements,
                                                       run_check=False, shape=p.shape, stride=p.stride())
                               .full_tensor().reshape(-1) for key, m in moments.items()}
                if rank0:
                    like = torch.empty(p.shape, dtype=p.dtype)
                    whole[i] = self._state_from_moments(like, {k: m.cpu() for k, m in moments.items()},
                                                        state["step"].cpu())
            return {"state": whole, "param_groups": packed["param_groups"]} if rank0 else {}

        def load_full_state_dict(self, state_dict: dict) -> None:
            """Load a state in one process's layout (state_dict(), or full_state_dict() of a sharded
            run) into this optimizer, whose parameters may be FSDP2 shards: each rank dequantizes the
            whole moments, keeps its shard's and quantizes them in its own blocks. Every rank passes
            the whole state; no communication."""
            from torch.distributed.tensor import DTensor, Replicate

            params = [p for group in self.param_groups for p in group["params"]]
            local = {}
            for i, state in state_dict["state"].items():
                p = params[i]
                if not isinstance(p, DTensor):
                    local[i] = state
                    continue
                mesh = p.device_mesh
                moments = {}
                for key, m in _whole_moments(state).items():
                    if m.numel() != p.numel():
                        raise ValueError(f"optimizer state {key!r} of parameter {i} holds {m.numel()} values, the "
                                         f"parameter {p.numel()} (shape {tuple(p.shape)}): the state is not this model's")
                    # Replicate -> the parameter's placements is a local slice, the same chunks FSDP2 cut
                    moments[key] = (DTensor.from_local(m.to(_local(p).device).reshape(p.shape), mesh,
                                                       [Replicate()] * mesh.ndim, run_check=False)
                                    .redistribute(mesh, p.placements).to_local().reshape(-1))
                local[i] = self._state_from_moments(p, moments, state["step"])
            self.load_state_dict({"state": local, "param_groups": state_dict["param_groups"]})

    BlockAlignedAdamW.__name__ = BlockAlignedAdamW.__qualname__ = {"adamw8bit": "AdamW8bit",
                                                                   "adamw4bit": "AdamW4bit"}[name]
    return BlockAlignedAdamW


@functools.cache
def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter or gradient (a DTensor; under no_grad, the tensor FSDP2
    all-gathers from, so updating it updates the parameter), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole_moments(state: dict) -> dict[str, torch.Tensor]:
    """A low-bit state's moments as flat fp32 vectors (prefix dequantized, tail appended), and its
    master copy if it keeps one."""
    moments = {}
    for key in ("exp_avg", "exp_avg_sq"):
        whole = _dequantized(state[key])
        if key + "_tail" in state:
            whole = torch.cat([whole, state[key + "_tail"].float().reshape(-1)])
        moments[key] = whole
    if "master" in state:
        moments["master"] = state["master"].float().reshape(-1)
    return moments


def _is_quantized(t: torch.Tensor) -> bool:
    return type(t) is not torch.Tensor and hasattr(t, "dequantize")


def _dequantized(t: torch.Tensor) -> torch.Tensor:
    return (t.dequantize() if _is_quantized(t) else t).float().reshape(-1)


def _set_masters_aside(optimizer, state_dict):
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    by_id = dict(zip(saved_ids, params))
    state = {i: dict(s) for i, s in state_dict["state"].items()}
    optimizer._masters_loading = [(by_id[i], s.pop("master")) for i, s in state.items() if "master" in s]
    return {**state_dict, "state": state}


def _restore_masters(optimizer):
    masters, optimizer._masters_loading = optimizer._masters_loading, []
    if masters and not optimizer.master_weights:
        raise ValueError("this optimizer state holds fp32 master weights: build the optimizer with master_weights=True")
    for p, master in masters:
        optimizer.state[p]["master"] = master.to(device=p.device, dtype=torch.float32)


def state_bytes_per_element(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> float:
    """Bytes of `optimizer`'s state for `param` per element (quantized codes, scales, tails, master;
    not the step counter): what the memory tables report."""
    total = 0
    for key, t in optimizer.state.get(param, {}).items():
        if key == "step" or not torch.is_tensor(t):
            continue
        total += tensor_bytes(t)
    return total / max(1, param.numel())


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside torchao's quantized state subclasses (codes, scale, qmap)."""
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


class StepInBackward:
    """The handle step_in_backward() returns: `remove()` puts the optimizer back to stepping after
    backward. `largest_grad_bytes` is the largest gradient it held at once (one parameter's)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.largest_grad_bytes = 0
        self._handles = []
        seen = set()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in seen or not p.requires_grad:
                    continue
                seen.add(id(p))
                self._handles.append(p.register_post_accumulate_grad_hook(self._step_one))

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        self.largest_grad_bytes = max(self.largest_grad_bytes, p.grad.numel() * p.grad.element_size())
        group = next((g for g in self.optimizer.param_groups if any(q is p for q in g["params"])), None)
        if group is None:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} got a gradient but is no longer in the "
                               "optimizer (a layer replaced by sparsify?): call step_in_backward again after "
                               "changing the parameters")
        # The optimizer's own step() over this one parameter: the same update, whatever the optimizer.
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**group, "params": [p]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        p.grad = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def step_in_backward(optimizer: torch.optim.Optimizer) -> StepInBackward:
    """Update each of `optimizer`'s parameters inside backward, as soon as its gradient is complete, and
    free the gradient (the module's docstring). After it, a training step is `loss.backward()` alone:
    optimizer.step() finds no gradients and does nothing; schedulers set the rate as before. Call it
    once the parameters are final (after sparsify), and not with gradient clipping, accumulation or DDP."""
    return StepInBackward(optimizer)
