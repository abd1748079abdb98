"""Compressed weight formats.

CSR (compressed sparse row) for unstructured sparsity, as plain tensors so that the ops, the
optimizer and checkpoints see nothing but ordinary tensors (torchao's block-sparse ops did the same):

    values   [nnz]              fp32 / bf16 / fp16 / fp64, the kept weights in row-major order
    row_ptr  [out_features + 1] int32, row r's nonzeros are values[row_ptr[r]:row_ptr[r + 1]]
    col_idx  [nnz]              uint16 when in_features <= 65536, else int32; strictly increasing
                                within a row. int16 (what checkpoints before uint16 hold, up to
                                32768 columns) is accepted too.

Index overhead is 2 bytes per nonzero (uint16: t5-11b's 65536-wide FFN output fits; int16 would have
needed int32 there, 4 bytes) plus 4 bytes per row: there is deliberately no transposed copy of the
index (README "How the CSR kernels work": it would cost 6-8 more bytes per nonzero); the dX kernel
scatters by column instead.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT16_MAX_COLUMNS = 32768  # column ids 0..32767 fit in int16
UINT16_MAX_COLUMNS = 65536  # column ids 0..65535 fit in uint16
INDEX_DTYPES = (torch.uint16, torch.int16, torch.int32)
_MAX_COLUMNS = {torch.uint16: UINT16_MAX_COLUMNS, torch.int16: INT16_MAX_COLUMNS}


def index_dtype_for(in_features: int) -> torch.dtype:
    """The narrowest column-index dtype that addresses `in_features` columns.

    torch implements few operations for uint16 beyond copies, indexing and concatenation: code that
    computes with column ids converts them first (`col_idx.to(torch.int64)`)."""
    return torch.uint16 if in_features <= UINT16_MAX_COLUMNS else torch.int32


def _check_index_width(index_dtype: torch.dtype, in_features: int, prefix: str = "") -> None:
    limit = _MAX_COLUMNS.get(index_dtype)
    if limit is not None and in_features > limit:
        name = str(index_dtype).replace("torch.", "")
        raise ValueError(f"{prefix}{name} col_idx addresses at most {limit} columns, in_features is {in_features}")


class _CompressedWeight:
    """Shape bookkeeping shared by the formats (subclasses are dataclasses with values and shape)."""

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        return self.values.numel()


def _check_dense_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in VALUE_DTYPES:
        raise TypeError(f"weight dtype must be one of {VALUE_DTYPES}, got {weight.dtype}")


@dataclass
class CSRWeight(_CompressedWeight):
    """A [out_features, in_features] weight in CSR form. See the module docstring for the layout."""

    values: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        mask: torch.Tensor | None = None,
        index_dtype: torch.dtype | None = None,
    ) -> "CSRWeight":
        """Compress `weight` keeping the positions where `mask` is True.

        Every masked position is stored, even if its weight is 0: the pattern is what training
        keeps, and a zero weight may grow. With no mask, the nonzeros of `weight` are kept.
        """
        _check_dense_weight(weight)
        if mask is None:
            mask = weight != 0
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        out_features, in_features = weight.shape
        index_dtype = index_dtype or index_dtype_for(in_features)
        if index_dtype not in INDEX_DTYPES:
            raise TypeError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype}")
        _check_index_width(index_dtype, in_features)
        # One flat index of the kept positions (8 B per kept weight) gives the values, the columns and
        # the row pointers. Nothing here is the size of the weight in int64: mask.sum(dim=1,
        # dtype=int64) converts the whole mask first (measured: +537 MB for one 1024 x 65536 t5-11b
        # weight, which was the peak of its prune-at-load), and mask.nonzero() / weight[mask] build
        # [nnz, 2] indices.
        flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major order, so sorted within each row
        if flat.numel() > torch.iinfo(torch.int32).max:
            raise ValueError("too many nonzeros for an int32 row_ptr")
        row_starts = torch.arange(out_features + 1, dtype=torch.int64, device=weight.device) * in_features
        row_ptr = torch.searchsorted(flat, row_starts)  # kept positions before each row's first
        values = weight.detach().reshape(-1).index_select(0, flat)
        cols = flat.remainder_(in_features).to(index_dtype)
        del flat
        return cls(values=values, row_ptr=row_ptr.to(torch.int32), col_idx=cols, shape=(out_features, in_features))

    def row_indices(self) -> torch.Tensor:
        """The row of every nonzero, [nnz] int64."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(self.out_features, device=self.row_ptr.device), counts)

    def mask(self) -> torch.Tensor:
        """The boolean [out_features, in_features] pattern."""
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        m[self.row_indices(), self.col_idx.to(torch.int64)] = True
        return m

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        dense[self.row_indices(), self.col_idx.to(torch.int64)] = self.values.detach()
        return dense

    def validate(self) -> None:
        """Raise ValueError (TypeError for a wrong dtype) naming the first fault found."""
        validate_csr(self.values, self.row_ptr, self.col_idx, self.shape)


def validate_csr(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape) -> None:
    """Check a CSR triple against the layout in this module's docstring."""
    if len(shape) != 2 or shape[0] < 0 or shape[1] < 0:
        raise ValueError(f"invalid CSR: shape must be (out_features, in_features) >= 0, got {tuple(shape)}")
    out_features, in_features = int(shape[0]), int(shape[1])
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"invalid CSR: values dtype must be one of {VALUE_DTYPES}, got {values.dtype}")
    if row_ptr.dtype != torch.int32:
        raise TypeError(f"invalid CSR: row_ptr must be int32, got {row_ptr.dtype}")
    if col_idx.dtype not in INDEX_DTYPES:
        raise TypeError(f"invalid CSR: col_idx must be uint16, int16 or int32, got {col_idx.dtype}")
    _check_index_width(col_idx.dtype, in_features, "invalid CSR: ")
    if values.dim() != 1 or col_idx.dim() != 1 or row_ptr.dim() != 1:
        raise ValueError(
            "invalid CSR: values, row_ptr and col_idx must be 1-D, got shapes "
            f"{tuple(values.shape)}, {tuple(row_ptr.shape)}, {tuple(col_idx.shape)}"
        )
    if not (values.device == row_ptr.device == col_idx.device):
        raise ValueError(
            f"invalid CSR: values, row_ptr and col_idx must share a device, got "
            f"{values.device}, {row_ptr.device}, {col_idx.device}"
        )
    if row_ptr.numel() != out_features + 1:
        raise ValueError(f"invalid CSR: row_ptr has length {row_ptr.numel()}, expected out_features + 1 = {out_features + 1}")
    nnz = values.numel()
    if col_idx.numel() != nnz:
        raise ValueError(f"invalid CSR: col_idx has {col_idx.numel()} entries but values has {nnz}")
    if values.device.type == "meta":  # a skeleton to be filled by load_state_dict: no data to check
        return
    rp = row_ptr.to(torch.int64)
    if int(rp[0]) != 0:
        raise ValueError(f"invalid CSR: row_ptr[0] must be 0, got {int(rp[0])}")
    if int(rp[-1]) != nnz:
        raise ValueError(f"invalid CSR: row_ptr[-1] = {int(rp[-1])} must equal nnz = {nnz}")
    steps = rp[1:] - rp[:-1]
    if bool((steps < 0).any()):
        row = int((steps < 0).nonzero()[0])
        raise ValueError(f"invalid CSR: row_ptr is not monotone: row_ptr[{row}] > row_ptr[{row + 1}]")
    if nnz == 0:
        return
    cols = col_idx.to(torch.int64)
    bad = (cols < 0) | (cols >= in_features)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"invalid CSR: col_idx[{k}] = {int(cols[k])} is outside [0, in_features = {in_features})")
    # Within a row, each column must be greater than the previous one (sorted, no duplicates).
    starts_row = torch.zeros(nnz, dtype=torch.bool, device=cols.device)
    nonempty_starts = rp[:-1][steps > 0]
    starts_row[nonempty_starts] = True
    not_increasing = (cols[1:] <= cols[:-1]) & ~starts_row[1:]
    if bool(not_increasing.any()):
        k = int(not_increasing.nonzero()[0]) + 1
        kind = "duplicated" if int(cols[k]) == int(cols[k - 1]) else "unsorted"
        raise ValueError(f"invalid CSR: columns {kind} within a row at col_idx[{k}] = {int(cols[k])}")


# ---- 2:4 semi-structured -------------------------------------------------------------------------
# In every group of 4 consecutive inputs of a row, 2 weights are kept.
#   values [out, in/2]            the kept weights, row-major, in position order within each group
#   meta   [out, ceil(in/8)] uint8 one nibble per group (group g in byte g // 2, low nibble for even
#                                  g): bits 0-1 the first kept position, bits 2-3 the second, first < second;
#                                  the high nibble of a last, odd group is 0. 2 bits per kept value.
# in_features must be divisible by 4 (every T5 size is); other sizes get a ValueError.

def semi24_meta_width(in_features: int) -> int:
    return (in_features // 4 + 1) // 2


def semi24_nibbles(meta: torch.Tensor, out_features: int) -> torch.Tensor:
    """[out, 2 * meta width] uint8: the nibble of every group, in group order (plus the pad nibble
    of an odd last group)."""
    # An explicit width: -1 is ambiguous for a weight with no rows.
    return torch.stack([meta & 0xF, meta >> 4], -1).reshape(out_features, 2 * meta.shape[-1])


def semi24_positions(meta: torch.Tensor, shape, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """[out, in/2] column of every kept value, decoded from `meta` on its device."""
    out_features, in_features = int(shape[0]), int(shape[1])
    groups = in_features // 4
    nibbles = semi24_nibbles(meta, out_features)[:, :groups].to(dtype)
    base = torch.arange(groups, device=meta.device, dtype=dtype) * 4
    return torch.stack([base + (nibbles & 3), base + (nibbles >> 2)], -1).reshape(out_features, in_features // 2)


def semi24_magnitude_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every group of 4 consecutive inputs (ties: the earlier position)."""
    out_features, in_features = weight.shape
    if in_features % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
    groups = weight.detach().abs().float().reshape(out_features, in_features // 4, 4)
    top2 = torch.topk(groups, 2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top2, True)
    return mask.reshape(out_features, in_features)


@dataclass
class Semi24Weight(_CompressedWeight):
    """A [out_features, in_features] weight in 2:4 form. See the layout above."""

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "Semi24Weight":
        """Compress `weight`, keeping `mask` (which must be 2:4) or, with no mask, the 2 largest |w|
        of every group of 4."""
        _check_dense_weight(weight)
        out_features, in_features = weight.shape
        if in_features % 4:
            raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {in_features}")
        if mask is None:
            mask = semi24_magnitude_mask(weight)
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
        mask = mask.to(device=weight.device, dtype=torch.bool)
        per_group = mask.reshape(out_features, in_features // 4, 4).sum(-1)
        if bool((per_group != 2).any()):
            r, g = (per_group != 2).nonzero()[0].tolist()
            raise ValueError(f"mask is not 2:4: row {r}, group {g} keeps {int(per_group[r, g])} of 4")
        groups = in_features // 4
        positions = mask.reshape(out_features, groups, 4).nonzero()[:, 2].reshape(out_features, groups, 2)
        nibbles = (positions[..., 0] | (positions[..., 1] << 2)).to(torch.uint8)
        if groups % 2:
            nibbles = torch.cat([nibbles, torch.zeros(out_features, 1, dtype=torch.uint8, device=nibbles.device)], 1)
        meta = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
        values = weight.detach()[mask].reshape(out_features, in_features // 2).contiguous()
        return cls(values, meta, (out_features, in_features))

    def positions(self) -> torch.Tensor:
        """[out, in/2] int64 column of every kept value."""
        return semi24_positions(self.meta, self.shape)

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.shape, dtype=torch.bool, device=self.meta.device)
        return m.scatter_(1, self.positions(), True)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        return dense.scatter_(1, self.positions(), self.values.detach())

    def validate(self) -> None:
        validate_semi24(self.values, self.meta, self.shape)


def validate_semi24(values: torch.Tensor, meta: torch.Tensor, shape) -> None:
    """Raise ValueError (TypeError for a wrong dtype) naming the first fault of a 2:4 weight."""
    out_features, in_features = int(shape[0]), int(shape[1])
    if in_features % 4:
        raise ValueError(f"invalid 2:4 weight: in_features must be divisible by 4, got {in_features}")
    if values.dtype not in VALUE_DTYPES:
        raise TypeError(f"invalid 2:4 weight: values dtype must be one of {VALUE_DTYPES}, got {values.dtype}")
    if meta.dtype != torch.uint8:
        raise TypeError(f"invalid 2:4 weight: meta must be uint8, got {meta.dtype}")
    if tuple(values.shape) != (out_features, in_features // 2):
        raise ValueError(f"invalid 2:4 weight: values must have shape {(out_features, in_features // 2)}, "
                         f"got {tuple(values.shape)}")
    width = semi24_meta_width(in_features)
    if tuple(meta.shape) != (out_features, width):
        raise ValueError(f"invalid 2:4 weight: meta must have shape {(out_features, width)}, got {tuple(meta.shape)}")
    if meta.device.type == "meta":
        return
    groups = in_features // 4
    nibbles = semi24_nibbles(meta, out_features)
    used = nibbles[:, :groups]
    bad = (used & 3) >= (used >> 2)
    if bool(bad.any()):
        r, g = bad.nonzero()[0].tolist()
        n = int(used[r, g])
        raise ValueError(f"invalid 2:4 weight: malformed meta at row {r}, group {g}: positions {n & 3} and {n >> 2} "
                         "must be distinct and increasing")
    if groups % 2 and bool((nibbles[:, groups] != 0).any()):
        raise ValueError("invalid 2:4 weight: malformed meta: the unused high nibble of the last byte must be 0")


# ---- validation once per structure --------------------------------------------------------------
class _ValidatedStructures:
    """Structure tensors (row_ptr/col_idx, or meta) that passed validation, remembered until they are
    modified in place (their version counter moves) or freed.

    Why: the CUDA bodies of the ops (Triton) gather through these indices, so a malformed structure
    would read out of bounds; but a full check costs a device-to-host sync, too much for every call
    of a layer whose GEMM takes tens of microseconds on an H100. The structure of a layer never
    changes between calls, so checking it once per version gives the CPU ops' guarantee (a clear
    ValueError, never an illegal memory access) at the price of one check per layer."""

    def __init__(self):
        self._seen: dict = {}

    def check(self, tensors, extra, validate) -> None:
        try:
            versions = tuple(t._version for t in tensors)
        except RuntimeError:  # inference tensors have no version counter: check every call
            validate()
            return
        key = tuple(id(t) for t in tensors) + tuple(extra)
        entry = self._seen.get(key)
        if entry is not None and entry[1] == versions and all(r() is t for r, t in zip(entry[0], tensors)):
            return
        validate()
        refs = tuple(weakref.ref(t, lambda _, k=key: self._seen.pop(k, None)) for t in tensors)
        self._seen[key] = (refs, versions)


_VALIDATED = _ValidatedStructures()


def validate_csr_structure_once(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, shape) -> None:
    """validate_csr, skipped for a structure already validated and unchanged since (see above)."""
    extra = (values.numel(), values.dtype, int(shape[0]), int(shape[1]))
    _VALIDATED.check((row_ptr, col_idx), extra, lambda: validate_csr(values, row_ptr, col_idx, shape))


def validate_semi24_structure_once(values: torch.Tensor, meta: torch.Tensor, shape) -> None:
    """validate_semi24, skipped for metadata already validated and unchanged since."""
    extra = (tuple(values.shape), values.dtype, int(shape[0]), int(shape[1]))
    _VALIDATED.check((meta,), extra, lambda: validate_semi24(values, meta, shape))
