"""SparseLinear: a Linear layer whose weight exists only in compressed form.

Parameters are `values` (the nonzeros) and `bias`; the structure (`row_ptr`, `col_idx`) is a pair of
buffers. No dense weight exists anywhere, so a stock optimizer keeps state for the nonzeros only and
`state_dict()` holds the compressed tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import CSRWeight, index_dtype_for, validate_csr
from .ops.csr_linear import csr_linear


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W stored as CSR.

    Build with `SparseLinear.from_dense(linear_or_weight, mask)`; go back with `to_dense()` or
    `to_linear()`.
    """

    format = "csr"

    def __init__(self, weight: CSRWeight, bias: torch.Tensor | None = None):
        super().__init__()
        weight.validate()
        self.out_features, self.in_features = weight.shape
        self.values = nn.Parameter(weight.values.detach().clone())
        self.register_buffer("row_ptr", weight.row_ptr.clone())
        self.register_buffer("col_idx", weight.col_idx.clone())
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(weight.values.dtype))
        else:
            self.register_parameter("bias", None)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> "SparseLinear":
        """Compress an nn.Linear (its bias comes along) or a [out, in] weight, keeping `mask`."""
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight
            if bias is None and linear_or_weight.bias is not None:
                bias = linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight = linear_or_weight
        else:
            raise TypeError(f"expected nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}")
        return cls(CSRWeight.from_dense(weight.detach(), mask, index_dtype=index_dtype), bias)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        nnz: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> "SparseLinear":
        """A placeholder with the right tensor shapes for `nnz` nonzeros, to be filled by
        load_state_dict (how checkpoints are loaded without ever building a dense weight).
        Until then its nonzeros are the first `nnz` positions in row-major order, all zero."""
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must be in [0, {in_features * out_features}], got {nnz}")
        # Arithmetic only (no bincount), so this also runs on the meta device.
        width = max(in_features, 1)
        row_ptr = (torch.arange(out_features + 1, device=device) * width).clamp_(max=nnz)
        cols = torch.arange(nnz, device=device) % width
        weight = CSRWeight(
            values=torch.zeros(nnz, dtype=dtype, device=device),
            row_ptr=row_ptr.to(torch.int32),
            col_idx=cols.to(index_dtype_for(in_features)),
            shape=(out_features, in_features),
        )
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        return cls(weight, b)

    # ---- compute -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return csr_linear(x, self.values, self.row_ptr, self.col_idx, self.out_features, self.in_features, self.bias)

    # ---- views of the weight ---------------------------------------------------------------------
    def csr(self) -> CSRWeight:
        return CSRWeight(self.values, self.row_ptr, self.col_idx, (self.out_features, self.in_features))

    def to_dense(self) -> torch.Tensor:
        """The dense [out, in] weight (a new tensor; zeros at pruned positions)."""
        return self.csr().to_dense()

    def mask(self) -> torch.Tensor:
        return self.csr().mask()

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        total = self.in_features * self.out_features
        return 1.0 - self.nnz / total if total else 0.0

    def memory_bytes(self) -> int:
        """Bytes held by this layer's parameters and buffers (not grads or optimizer state)."""
        tensors = [self.values, self.row_ptr, self.col_idx] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format=csr, nnz={self.nnz}, sparsity={self.sparsity:.3f}")

    # ---- checkpoints -------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold a different number of nonzeros (e.g. after re-pruning): adopt its
        # structure, after checking it, instead of failing on the shape of `values`.
        keys = [prefix + k for k in ("values", "row_ptr", "col_idx")]
        if all(k in state_dict for k in keys):
            values, row_ptr, col_idx = (state_dict[k] for k in keys)
            try:
                validate_csr(values, row_ptr, col_idx, (self.out_features, self.in_features))
            except (ValueError, TypeError) as err:
                raise ValueError(f"corrupt sparse weight at '{prefix[:-1]}': {err}") from err
            if values.shape != self.values.shape:
                self.values = nn.Parameter(torch.empty_like(values, device=self.values.device,
                                                            dtype=self.values.dtype))
            if row_ptr.shape != self.row_ptr.shape or col_idx.shape != self.col_idx.shape or \
                    col_idx.dtype != self.col_idx.dtype:
                self.row_ptr = torch.empty_like(row_ptr, device=self.row_ptr.device)
                self.col_idx = torch.empty_like(col_idx, device=self.col_idx.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
