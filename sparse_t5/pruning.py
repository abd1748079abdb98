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


def _scores(module: nn.Module) -> torch.Tensor:
    """|w| of the weights a module still has: all of a dense Linear, the nonzeros of a sparse one."""
    if isinstance(module, SparseLinear):
        return module.values.detach().abs().float()
    return module.weight.detach().abs().float().flatten()


def _dense_size(module: nn.Module) -> int:
    return module.in_features * module.out_features


def _keep_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask with exactly min(k, n) True at the largest scores (ties broken by position)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    k = max(0, min(int(k), scores.numel()))
    if k > 0:
        keep[torch.topk(scores, k, sorted=False).indices] = True
    return keep


def magnitude_keep(modules: dict[str, nn.Module], sparsity: float, scope: str = "layer") -> dict[str, torch.Tensor]:
    """For each module, a boolean keep-mask over its current weights (`_scores` order).

    scope="layer": each layer keeps round((1 - s) * out * in) weights.
    scope="global": all layers together keep round((1 - s) * sum(out * in)); a layer's share
    follows its magnitudes.
    A sparse layer that already holds fewer weights than asked keeps them all (no densifying).
    """
    sparsity = check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if scope == "layer":
        return {name: _keep_largest(_scores(m), round((1 - sparsity) * _dense_size(m))) for name, m in modules.items()}
    names = list(modules)
    scores = [_scores(modules[n]) for n in names]
    total_keep = round((1 - sparsity) * sum(_dense_size(modules[n]) for n in names))
    keep_all = _keep_largest(torch.cat(scores), total_keep) if scores else torch.zeros(0, dtype=torch.bool)
    return dict(zip(names, torch.split(keep_all, [s.numel() for s in scores])))


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
    keep the per-element state (e.g. Adam's exp_avg, exp_avg_sq) of the surviving elements."""
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
    if old in optimizer.state:
        state = optimizer.state.pop(old)
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
