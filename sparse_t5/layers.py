"""SparseLinear: a Linear layer whose weight exists only in compressed form.

`SparseLinear` is the format-generic front: `SparseLinear.from_dense(linear, mask, format="csr")`,
`SparseLinear(CSRWeight(...))` and `SparseLinear.empty(..., format=...)` give the layer class of the
format, `CSRLinear` ("csr", unstructured) or `Semi24Linear` ("2:4"), which share this interface:

- parameters: `values` (the kept weights) and `bias`; the structure is buffers (`row_ptr` and
  `col_idx` for CSR, `meta` for 2:4). No dense weight exists anywhere, so a stock optimizer keeps
  state for the kept weights only, and `state_dict()` holds the compressed tensors.
- `to_dense()`, `to_linear()`, `mask()`, `nnz`, `sparsity`, `memory_bytes()`.
"""
from __future__ import annotations

import torch
from torch import nn

from .formats import CSRWeight, Semi24Weight, index_dtype_for, semi24_meta_width, validate_csr, validate_semi24
from .ops.csr_linear import csr_linear
from .ops.semi24_linear import semi24_linear


def weight_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a Linear's weight, dense or sparse."""
    return module.values.dtype if isinstance(module, SparseLinear) else module.weight.dtype


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W stored compressed. See the module docstring."""

    format: str = ""
    _formats: dict[str, type] = {}
    _weight_types: dict[type, type] = {}

    def __new__(cls, weight=None, bias=None):
        if cls is SparseLinear:  # pick the subclass for the weight's format
            if type(weight) not in SparseLinear._weight_types:
                raise TypeError(f"SparseLinear needs a CSRWeight or Semi24Weight, got {type(weight).__name__}")
            cls = SparseLinear._weight_types[type(weight)]
        return super().__new__(cls)

    def __init_subclass__(cls, weight_type=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if weight_type is not None:
            SparseLinear._formats[cls.format] = cls
            SparseLinear._weight_types[weight_type] = cls

    def __init__(self, weight, bias: torch.Tensor | None = None):
        """Adopt a compressed weight (a copy): `values` becomes the parameter, the structure tensors
        (`_structure_keys`) buffers."""
        super().__init__()
        weight.validate()
        self.out_features, self.in_features = weight.shape
        self.values = nn.Parameter(weight.values.detach().clone())
        for key in self._structure_keys():
            self.register_buffer(key, getattr(weight, key).clone())
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(weight.values.dtype))
        else:
            self.register_parameter("bias", None)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def layer_class(cls, format: str) -> type:
        if format not in SparseLinear._formats:
            raise ValueError(f"unknown sparse format {format!r}; available: {sorted(SparseLinear._formats)}")
        return SparseLinear._formats[format]

    @classmethod
    def from_dense(cls, linear_or_weight: nn.Linear | torch.Tensor, mask: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, format: str | None = None, **kwargs) -> "SparseLinear":
        """Compress an nn.Linear (its bias comes along) or an [out, in] weight, keeping `mask`
        (default: the nonzeros for CSR, the 2 largest of every 4 for 2:4)."""
        if isinstance(linear_or_weight, nn.Linear):
            weight = linear_or_weight.weight
            if bias is None and linear_or_weight.bias is not None:
                bias = linear_or_weight.bias
        elif isinstance(linear_or_weight, torch.Tensor):
            weight = linear_or_weight
        else:
            raise TypeError(f"expected nn.Linear or a weight tensor, got {type(linear_or_weight).__name__}")
        layer_cls = cls if cls is not SparseLinear else cls.layer_class(format or "csr")
        if format is not None and layer_cls.format != format:
            raise ValueError(f"{layer_cls.__name__} is format {layer_cls.format!r}, not {format!r}")
        return layer_cls(layer_cls._compress(weight.detach(), mask, **kwargs), bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, nnz: int | None = None, bias: bool = True,
              dtype: torch.dtype = torch.float32, device=None, format: str | None = None) -> "SparseLinear":
        """A placeholder with the tensor shapes of a checkpoint, to be filled by load_state_dict
        (how checkpoints load without ever building a dense weight). Its pattern is arbitrary
        and its values zero until then."""
        layer_cls = cls if cls is not SparseLinear else cls.layer_class(format or "csr")
        return layer_cls._empty(in_features, out_features, nnz, bias, dtype, device)

    # ---- shared behaviour ------------------------------------------------------------------------
    def _cast_for_autocast(self, x):
        """Under torch.autocast, compute in the autocast dtype like nn.Linear does: x, values and
        bias are cast (differentiably, so the fp32 values still receive their gradient)."""
        device = x.device.type
        # Straight from the registries: Module.__getattr__ costs ~0.5 us a name, and a t5-base decode
        # step calls 96 of these layers (benches/layer_call_overhead.py).
        params = self._parameters
        values, bias = params["values"], params["bias"]
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, values = x.to(dtype), values.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif x.dtype != values.dtype and x.is_floating_point():
            x = x.to(values.dtype)
        return x, values, bias

    def _index(self, key: str) -> torch.Tensor:
        """A structure tensor, as fast as _cast_for_autocast reads the values: a buffer, or a parameter
        where distributed.shard_model made it one to shard it."""
        t = self._buffers.get(key)
        return t if t is not None else self._parameters[key]

    def compressed(self):
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The dense [out, in] weight (a new tensor; zeros at pruned positions)."""
        return self.compressed().to_dense()

    def mask(self) -> torch.Tensor:
        return self.compressed().mask()

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
        tensors = list(self.parameters(recurse=False)) + list(self.buffers(recurse=False))
        return sum(t.numel() * t.element_size() for t in tensors)

    def layout_spec(self) -> dict:
        """What a checkpoint records to rebuild this layer's tensor shapes."""
        return {"format": self.format, "nnz": self.nnz, "in_features": self.in_features,
                "out_features": self.out_features}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format}, nnz={self.nnz}, sparsity={self.sparsity:.3f}")

    def _structure_keys(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _validate_loaded(self, tensors: dict) -> None:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint may hold a different number of kept weights (e.g. after re-pruning): adopt
        # its structure, after checking it, instead of failing on the shape of `values`.
        keys = ("values",) + self._structure_keys()
        if all(prefix + k in state_dict for k in keys):
            tensors = {k: state_dict[prefix + k] for k in keys}
            try:
                self._validate_loaded(tensors)
            except (ValueError, TypeError) as err:
                raise ValueError(f"corrupt sparse weight at '{prefix[:-1]}': {err}") from err
            if tensors["values"].shape != self.values.shape:
                self.values = nn.Parameter(torch.empty_like(tensors["values"], device=self.values.device,
                                                            dtype=self.values.dtype))
            for k in self._structure_keys():
                current = getattr(self, k)
                if tensors[k].shape != current.shape or tensors[k].dtype != current.dtype:
                    setattr(self, k, torch.empty_like(tensors[k], device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class CSRLinear(SparseLinear, weight_type=CSRWeight):
    """Unstructured sparsity in CSR form: values [nnz], row_ptr [out+1] int32, col_idx [nnz] uint16
    (int32 past 65536 inputs)."""

    format = "csr"

    @staticmethod
    def _compress(weight, mask, index_dtype=None):
        return CSRWeight.from_dense(weight, mask, index_dtype=index_dtype)

    @classmethod
    def _empty(cls, in_features, out_features, nnz, bias, dtype, device):
        nnz = 0 if nnz is None else int(nnz)
        if not 0 <= nnz <= in_features * out_features:
            raise ValueError(f"nnz must be in [0, {in_features * out_features}], got {nnz}")
        # Arithmetic only (no bincount), so this also runs on the meta device.
        width = max(in_features, 1)
        row_ptr = (torch.arange(out_features + 1, device=device) * width).clamp_(max=nnz)
        cols = torch.arange(nnz, device=device) % width
        weight = CSRWeight(values=torch.zeros(nnz, dtype=dtype, device=device), row_ptr=row_ptr.to(torch.int32),
                           col_idx=cols.to(index_dtype_for(in_features)), shape=(out_features, in_features))
        return cls(weight, torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, values, bias = self._cast_for_autocast(x)
        return csr_linear(x, values, self._index("row_ptr"), self._index("col_idx"), self.out_features,
                          self.in_features, bias)

    def compressed(self) -> CSRWeight:
        return CSRWeight(self.values, self.row_ptr, self.col_idx, (self.out_features, self.in_features))

    csr = compressed

    def layout_spec(self) -> dict:
        return {**super().layout_spec(), "index_dtype": str(self.col_idx.dtype).replace("torch.", "")}

    def _structure_keys(self):
        return ("row_ptr", "col_idx")

    def _validate_loaded(self, tensors):
        validate_csr(tensors["values"], tensors["row_ptr"], tensors["col_idx"], (self.out_features, self.in_features))


class Semi24Linear(SparseLinear, weight_type=Semi24Weight):
    """2:4 semi-structured sparsity: values [out, in/2], meta [out, ceil(in/8)] uint8 (2 bits per
    kept value). Exactly 50% sparse; the pattern never changes during training."""

    format = "2:4"

    @staticmethod
    def _compress(weight, mask):
        return Semi24Weight.from_dense(weight, mask)

    @classmethod
    def _empty(cls, in_features, out_features, nnz, bias, dtype, device):
        if in_features % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
        if nnz is not None and int(nnz) != out_features * in_features // 2:
            raise ValueError(f"a 2:4 layer of {out_features}x{in_features} keeps {out_features * in_features // 2} "
                             f"weights, not {nnz}")
        groups = in_features // 4
        # positions (0, 1) in every group: nibble 0b0100
        meta = torch.full((out_features, semi24_meta_width(in_features)), 0x44, dtype=torch.uint8, device=device)
        if groups % 2:
            meta[:, -1] = 0x04
        weight = Semi24Weight(torch.zeros(out_features, in_features // 2, dtype=dtype, device=device), meta,
                              (out_features, in_features))
        return cls(weight, torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, values, bias = self._cast_for_autocast(x)
        return semi24_linear(x, values, self._index("meta"), bias)

    def compressed(self) -> Semi24Weight:
        return Semi24Weight(self.values, self.meta, (self.out_features, self.in_features))

    def _structure_keys(self):
        return ("meta",)

    def _validate_loaded(self, tensors):
        validate_semi24(tensors["values"], tensors["meta"], (self.out_features, self.in_features))
