"""Pruning: which weights to keep.

- `magnitude_masks`: keep the largest |w|, per layer or globally over all targeted layers (the DSI
  study's rate of 0.2 was global L1, i.e. global magnitude).
- `cubic_sparsity` / `GradualPruner`: Zhu & Gupta (2017) gradual schedule,
  s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3, pruning every `frequency` steps.
- `shrink_sparse_linear_`: re-prune an already sparse layer in place; its CSR shrinks, it never
  densifies. `remap_optimizer_state_` keeps Adam moments of the survivors.

Sparsity is always measured against the layer's dense size (out * in).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .formats import CSRWeight
from .layers import SparseLinear

# T5's attention and feed-forward projections: the default pruning targets. Embeddings, layer
# norms, relative attention biases and lm_head stay dense.
DEFAULT_TARGETS = r"(SelfAttention|EncDecAttention)\.(q|k|v|o)$|DenseReluDense\.(wi|wi_0|wi_1|wo)$"


def check_sparsity(sparsity: float) -> float:
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or math.isnan(sparsity):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def select_targets(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Module]:
    """Linear / SparseLinear modules whose qualified name matches `include` (a regex or list of
    regexes; default: T5's attention and feed-forward projections) and no `exclude` regex."""
    include = [DEFAULT_TARGETS] if include is None else ([include] if isinstance(include, str) else list(include))
    exclude = [] if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, SparseLinear)):
            continue
        if any(re.search(p, name) for p in include) and not any(re.search(p, name) for p in exclude):
            found[name] = module
    return found


def _weights_to_rank(module: nn.Module) -> torch.Tensor:
    """The weights a module still has, flat (all of a dense Linear, the nonzeros of a sparse one): the
    selection below reads their magnitudes slice by slice, so no |w| copy of the model is made."""
    if isinstance(module, SparseLinear):
        return module.values.detach()
    return module.weight.detach().reshape(-1)


def _dense_size(module: nn.Module) -> int:
    return module.in_features * module.out_features


# ---- exact top-k by magnitude, streamable -------------------------------------------------------
# The k largest magnitudes over one or many tensors, with ties at the threshold broken by position
# (the earlier element in the tensors' order wins), so a mask is a function of the weights alone. The
# threshold is found by a two-pass radix select over the magnitudes' float32 bit patterns (monotone
# in value once the sign bit is cleared, which is what abs() does): pass 1 counts the high 16 bits,
# pass 2 the low 16 bits of the one bucket that holds the k-th largest. Memory is two histograms, so
# the same code selects over weights held in memory (`sparsify`) and over weights streamed one at a
# time from a checkpoint (prune-at-load), and both give the same masks. Every pass walks a tensor in
# CHUNK-element slices, so its temporaries stay small beside the tensor itself: t5-11b's 1024 x 65536
# feed-forward weights are 268 MB each, and whole-tensor temporaries (abs, the shifted bits, a cumsum
# of the ties in int64) had cost 3.8x that on top of the model while loading.
CHUNK = 1 << 22


def _magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """The float32 bit pattern of |x|, as int32: x's own with the sign bit cleared (= abs(x)'s)."""
    return x.detach().float().view(torch.int32) & 0x7FFFFFFF


def _chunks(scores: torch.Tensor):
    flat = scores.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, _magnitude_bits(flat[start:start + CHUNK])


@dataclass
class MagnitudeThreshold:
    """Keep every magnitude whose bits exceed `bits`, plus the first `ties` equal to it (in the order
    the tensors were given; `tie_counts[i]` is how many of item i equal it)."""

    bits: int
    ties: int
    keep_all: bool = False
    keep_none: bool = False
    tie_counts: list = field(default_factory=list)

    def allot_ties(self) -> list[int]:
        """How many of its ties each item keeps: the earliest items first."""
        budget, allot = self.ties, []
        for count in self.tie_counts:
            allot.append(min(budget, count))
            budget -= allot[-1]
        return allot

    def keep(self, scores: torch.Tensor, ties: int) -> torch.Tensor:
        """Flat keep mask for `scores` (weights or their magnitudes: only |.| counts), keeping its
        first `ties` elements equal to the threshold (its share from allot_ties)."""
        if self.keep_all or self.keep_none:
            return torch.full((scores.numel(),), self.keep_all, dtype=torch.bool, device=scores.device)
        keep = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
        tied = []
        for start, bits in _chunks(scores):
            torch.gt(bits, self.bits, out=keep[start:start + bits.numel()])
            if ties > sum(t.numel() for t in tied):
                tied.append((bits == self.bits).nonzero().reshape(-1) + start)  # few: one float value
        if tied:
            keep[torch.cat(tied)[:ties]] = True
        return keep


def top_k_threshold(score_passes, k: int) -> MagnitudeThreshold:
    """The threshold that keeps exactly k of the magnitudes of the tensors yielded by `score_passes()`
    (a callable that returns a fresh iterable of weight or magnitude tensors each time; it is called
    twice)."""
    hi = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0: the high half is < 2^15
    n = 0
    for scores in score_passes():
        n += scores.numel()
        for _, bits in _chunks(scores):
            hi += torch.bincount(bits >> 16, minlength=1 << 15).cpu()  # counted where the scores are
    k = int(k)
    if k <= 0:
        return MagnitudeThreshold(0, 0, keep_none=True)
    if k >= n:
        return MagnitudeThreshold(0, 0, keep_all=True)
    uniques = []  # per item: the low halves present in the bucket, and their counts
    above = torch.flip(torch.cumsum(torch.flip(hi, [0]), 0), [0])  # above[b] = count in buckets >= b
    bucket = int((above >= k).nonzero().max())
    greater = int(above[bucket + 1]) if bucket + 1 < hi.numel() else 0
    lo = torch.zeros(1 << 16, dtype=torch.int64)
    for scores in score_passes():
        in_bucket = torch.cat([bits[(bits >> 16) == bucket] & 0xFFFF for _, bits in _chunks(scores)]
                              or [torch.zeros(0, dtype=torch.int32, device=scores.device)])
        lo += torch.bincount(in_bucket, minlength=1 << 16).cpu()
        values, counts = torch.unique(in_bucket, return_counts=True)
        uniques.append((values.cpu(), counts.cpu()))
    need = k - greater
    lo_above = torch.flip(torch.cumsum(torch.flip(lo, [0]), 0), [0])
    low = int((lo_above >= need).nonzero().max())
    greater += int(lo_above[low + 1]) if low + 1 < lo.numel() else 0
    tie_counts = [int(counts[values == low].sum()) for values, counts in uniques]
    return MagnitudeThreshold((bucket << 16) | low, k - greater, tie_counts=tie_counts)


def keep_top_k(score_list: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Flat boolean masks keeping exactly min(k, n) of the largest magnitudes over all tensors together
    (ties broken by position, in list order)."""
    threshold = top_k_threshold(lambda: score_list, k)
    allot = threshold.allot_ties() or [0] * len(score_list)
    return [threshold.keep(scores, ties) for scores, ties in zip(score_list, allot)]


def magnitude_keep(modules: dict[str, nn.Module], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """For each module, a boolean keep-mask over its current weights (`_weights_to_rank` order).

    scope="layer": each layer keeps round((1 - s) * out * in) weights.
    scope="global": all layers together keep round((1 - s) * sum(out * in)); a layer's share
    follows its magnitudes. Ties at the threshold: the earlier weight (module order, then
    row-major) is kept.
    A sparse layer that already holds fewer weights than asked keeps them all (no densifying).
    """
    sparsity = check_sparsity(sparsity)
    check_scope(scope)
    if scope == "layer":
        return {name: keep_top_k([_weights_to_rank(m)], keep_count(_dense_size(m), sparsity))[0] for name, m in modules.items()}
    names = list(modules)
    masks = keep_top_k([_weights_to_rank(modules[n]) for n in names],
                       keep_count(sum(_dense_size(m) for m in modules.values()), sparsity))
    return dict(zip(names, masks))


def check_prune_args(sparsity, format: str, method: str = "magnitude"):
    """Validate sparsify's arguments; returns the SparseLinear class of `format`."""
    layer_cls = SparseLinear.layer_class(format)  # ValueError for an unknown format
    if method != "magnitude":
        raise ValueError(f"unknown pruning method {method!r}; available: ['magnitude']")
    if format == "2:4":
        if sparsity is not None and float(sparsity) != 0.5:
            raise ValueError(f"2:4 sparsity is 0.5 by construction, got sparsity={sparsity}")
    elif sparsity is None:
        raise ValueError("sparsity is required for format 'csr'")
    else:
        check_sparsity(sparsity)
    return layer_cls


def check_scope(scope: str) -> str:
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    return scope


def keep_count(dense_size: int, sparsity: float) -> int:
    """How many of `dense_size` weights a magnitude pruning to `sparsity` keeps."""
    return round((1 - sparsity) * dense_size)


def shrink_sparse_linear_(layer: SparseLinear, keep: torch.Tensor) -> torch.Tensor:
    """Drop the nonzeros of `layer` where `keep` (over its values) is False, in place.
    Returns the indices of the kept values (for remapping optimizer state)."""
    if layer.format != "csr":
        raise ValueError(f"only CSR layers can be re-pruned in place, this one is {layer.format!r}")
    if keep.shape != layer.values.shape:
        raise ValueError(f"keep mask has shape {tuple(keep.shape)}, values have {tuple(layer.values.shape)}")
    kept = keep.nonzero().flatten()
    rows = layer.csr().row_indices()[kept]
    counts = torch.bincount(rows, minlength=layer.out_features)
    row_ptr = torch.zeros(layer.out_features + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    new = CSRWeight(layer.values.detach()[kept].clone(), row_ptr.to(torch.int32),
                    layer.col_idx[kept].clone(), (layer.out_features, layer.in_features))
    new.validate()
    layer.values = nn.Parameter(new.values, requires_grad=layer.values.requires_grad)
    layer.row_ptr = new.row_ptr
    layer.col_idx = new.col_idx
    return kept


def remap_optimizer_state_(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                           kept: torch.Tensor) -> None:
    """After `old` was replaced by `new` = old.flatten()[kept], point the optimizer at `new` and
    keep the per-element state (e.g. Adam's exp_avg, exp_avg_sq) of the surviving elements. An
    optimizer whose state is not one tensor per element (sparse_t5.optim's 8- and 4-bit AdamW: quantized
    blocks) remaps it with its own `remap_state`."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    if hasattr(optimizer, "remap_state"):
        optimizer.remap_state(old, new, kept)
    elif old in optimizer.state:
        state = optimizer.state.pop(old)
        if any(torch.is_tensor(v) and type(v) is not torch.Tensor and not isinstance(v, nn.Parameter)
               for v in state.values()):
            raise TypeError(f"{type(optimizer).__name__} keeps its state in {sorted({type(v).__name__ for v in state.values()})}, "
                            "which cannot be gathered at the kept weights: prune with sparse_t5.optim's optimizers "
                            "(make_optimizer(..., 'adamw8bit')), which remap their quantized moments")
        optimizer.state[new] = {
            k: (v.reshape(-1)[kept].clone() if torch.is_tensor(v) and v.shape == old.shape else v)
            for k, v in state.items()
        }


def cubic_sparsity(step: int, final_sparsity: float, start_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule: initial_sparsity at start_step, final_sparsity from end_step on."""
    check_sparsity(final_sparsity)
    check_sparsity(initial_sparsity)
    if end_step <= start_step:
        return final_sparsity if step >= start_step else initial_sparsity
    if step <= start_step:
        return initial_sparsity
    progress = min(1.0, (step - start_step) / (end_step - start_step))
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


@dataclass
class GradualPruner:
    """Prunes `model` along the cubic schedule during training.

    Call `step(global_step, optimizer)` after each optimizer step; every `frequency` steps between
    start_step and end_step it re-prunes to the scheduled sparsity (shrinking the CSR) and remaps
    the optimizer state of the survivors.
    """

    model: nn.Module
    final_sparsity: float
    start_step: int
    end_step: int
    frequency: int = 100
    initial_sparsity: float = 0.0
    scope: str = "global"
    format: str = "csr"
    include: object = None
    exclude: object = None
    history: list = field(default_factory=list)

    def __post_init__(self):
        check_sparsity(self.final_sparsity)
        if self.frequency <= 0:
            raise ValueError(f"frequency must be > 0, got {self.frequency}")

    def due(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step + self.frequency:
            return False
        return (step - self.start_step) % self.frequency == 0 or step == self.end_step

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> float | None:
        if not self.due(step):
            return None
        target = cubic_sparsity(step, self.final_sparsity, self.start_step, self.end_step, self.initial_sparsity)
        self.model.sparsify(sparsity=target, format=self.format, scope=self.scope, include=self.include,
                            exclude=self.exclude, optimizer=optimizer)
        self.history.append((step, target))
        return target
