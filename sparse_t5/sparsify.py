"""Pruning and compressing a T5's Linears, in one place.

Both ways a model becomes sparse go through here, with the same selection, so prune-at-load equals
load-then-sparsify:
  - `sparsify(model, ...)`: a model in memory (SparseT5ForConditionalGeneration.sparsify,
    GradualPruner, and a checkpoint that is sparse already and is pruned further while loading);
  - `PrunePlan`: prune-at-load (checkpoint.load_pretrained), one dense weight at a time as the
    checkpoint streams, so the dense model is never held.
`kept_positions` is the one place that chooses what a weight keeps for each format, and
`compress` the one place that builds the sparse layer. The layout of a sparse model (config key
LAYOUT_KEY: each sparse layer's format, shape and nnz) is read and written here too.
Masks and selection arithmetic: pruning.py. Reading and writing files: checkpoint.py.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import semi24_magnitude_mask
from .layers import SparseLinear, weight_dtype
from .memory import release_freed_memory
from .pruning import (MagnitudeThreshold, check_prune_args, check_scope, keep_count, keep_top_k, magnitude_keep,
                      remap_optimizer_state_, select_targets, shrink_sparse_linear_, top_k_threshold)

LAYOUT_KEY = "sparse_t5"  # config key holding {"format_version", "layers": {name: {...}}}


# ---- the layout of a sparse model -----------------------------------------------------------------------
def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def layout_of(model) -> dict:
    return {"format_version": 1, "layers": {name: m.layout_spec() for name, m in model.sparse_layers().items()}}


def apply_layout(model, layout: dict) -> None:
    """Replace the named Linears by empty sparse layers of the recorded shapes (to be filled by a
    load). Raises ValueError if the layout does not fit this architecture."""
    if not isinstance(layout, dict) or not isinstance(layout.get("layers"), dict):
        raise ValueError(f"corrupt checkpoint: config key '{LAYOUT_KEY}' is not a sparsity layout")
    for name, spec in layout["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"checkpoint layout names layer '{name}', which this T5 config does not have") from None
        fmt = spec.get("format")
        try:
            SparseLinear.layer_class(fmt)
        except ValueError as err:
            raise ValueError(f"checkpoint layout: layer '{name}': {err}") from None
        if not isinstance(module, (nn.Linear, SparseLinear)) or (module.in_features, module.out_features) != (
                spec.get("in_features"), spec.get("out_features")):
            raise ValueError(f"checkpoint layout: layer '{name}' shape {spec.get('out_features')}x"
                             f"{spec.get('in_features')} does not match the config")
        device = module.values.device if isinstance(module, SparseLinear) else module.weight.device
        sparse = SparseLinear.empty(module.in_features, module.out_features, int(spec["nnz"]), bias=False,
                                    dtype=weight_dtype(module), device=device, format=fmt)
        replace_module(model, name, sparse)
    model.config.__dict__[LAYOUT_KEY] = layout


def record_layout(model) -> None:
    """Write the model's current sparse layout into its config (what save_pretrained stores)."""
    model.config.__dict__[LAYOUT_KEY] = layout_of(model)


# ---- what each weight keeps, and the layer that stores it ------------------------------------------------
def kept_positions(format: str, weight: torch.Tensor, sparsity: float | None = None,
                   threshold: MagnitudeThreshold | None = None, tie_share: int = 0) -> torch.Tensor:
    """The flat bool mask of what one `weight` keeps: for "2:4", the 2 largest |w| of every 4
    inputs; for "csr", its own top (1 - sparsity) by |w| (layer scope), or what a global `threshold`
    keeps of it (with this layer's `tie_share` of the weights at the threshold). Magnitudes are read
    from the weight's bits in slices: no |w| copy of the tensor. (Global scope over a model in memory
    takes all targets at once: pruning.magnitude_keep.)"""
    if format == "2:4":
        return semi24_magnitude_mask(weight).flatten()
    if threshold is not None:
        return threshold.keep(weight, tie_share)
    return keep_top_k([weight], keep_count(weight.numel(), sparsity))[0]


def compress(layer_cls, linear_or_weight, keep: torch.Tensor) -> SparseLinear:
    """The sparse layer of class `layer_cls` holding the positions `keep` (flat bool) of a dense
    Linear (with its bias) or weight."""
    weight = linear_or_weight.weight if isinstance(linear_or_weight, nn.Linear) else linear_or_weight
    return layer_cls.from_dense(linear_or_weight, keep.view(weight.shape))


# ---- a model in memory ------------------------------------------------------------------------------------
@torch.no_grad()
def sparsify(model, sparsity: float | None = None, format: str = "csr", method: str = "magnitude",
             scope: str = "layer", include=None, exclude=None, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The body of SparseT5ForConditionalGeneration.sparsify (see its docstring)."""
    layer_cls = check_prune_args(sparsity, format, method)
    targets = select_targets(model, include, exclude)
    if not targets:
        raise ValueError("no Linear layer matches the include/exclude patterns")
    for name, module in targets.items():
        if isinstance(module, SparseLinear) and module.format != format:
            raise ValueError(f"{name} is already sparse in format {module.format!r}, not {format!r}")
    if format == "2:4":  # already 2:4 layers keep what they have
        keep = {n: kept_positions(format, m.weight) for n, m in targets.items() if not isinstance(m, SparseLinear)}
    else:  # layer or global scope over the targets, sparse ones by their values
        keep = magnitude_keep(targets, sparsity, scope)
    for name, module in targets.items():
        if isinstance(module, SparseLinear):
            if name not in keep or bool(keep[name].all()):
                continue
            old = module.values
            kept = shrink_sparse_linear_(module, keep[name])
            if optimizer is not None:
                remap_optimizer_state_(optimizer, old, module.values, kept)
        else:
            sparse = compress(layer_cls, module, keep[name])
            if optimizer is not None:
                remap_optimizer_state_(optimizer, module.weight, sparse.values, keep[name].nonzero().flatten())
            replace_module(model, name, sparse)
    record_layout(model)
    return {n: m.sparsity for n, m in model.sparse_layers().items()}


# ---- prune-at-load ----------------------------------------------------------------------------------------
class PrunePlan:
    """Which Linear weights prune-at-load compresses, and how; masks equal `sparsify`'s.

    `weight_keys` maps a target's weight key to its module name. With global scope, the threshold is
    found first over every target weight (`read(key)` returns one, cast as it will be loaded), streamed
    twice; layer scope needs nothing ahead."""

    def __init__(self, model, weight_sources: dict[str, str], read, sparsity, format, scope, include, exclude):
        self.layer_cls = check_prune_args(sparsity, format, "magnitude")
        self.format, self.sparsity, self.scope = format, sparsity, scope
        targets = select_targets(model, include, exclude)
        if not targets:
            raise ValueError("no Linear layer matches the include/exclude patterns")
        self.targets = list(targets)  # module order, as sparsify concatenates them
        self.weight_keys = {name + ".weight": name for name in self.targets}
        self.allot: dict[str, int] = {}
        self.threshold: MagnitudeThreshold | None = None
        if format == "csr" and check_scope(scope) == "global":
            sources = [weight_sources[name + ".weight"] for name in self.targets]

            def scores():  # the targets' weights (magnitudes count), streamed in module order, read twice
                for source in sources:
                    yield read(source)
                    release_freed_memory()

            dense_size = sum(targets[n].in_features * targets[n].out_features for n in self.targets)
            self.threshold = top_k_threshold(scores, keep_count(dense_size, sparsity))
            self.allot = dict(zip(self.targets, self.threshold.allot_ties()))

    def compress(self, name: str, weight: torch.Tensor) -> SparseLinear:
        keep = kept_positions(self.format, weight, self.sparsity, self.threshold, self.allot.get(name, 0))
        return compress(self.layer_cls, weight, keep)
