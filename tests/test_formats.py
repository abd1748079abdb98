"""The sparse weight formats (sparse_t5/formats.py): CSR and 2:4 compression, layout and validation.

The ops' own checks of the same structures: tests/test_ops_fuzz.py, tests/test_csr_linear.py,
tests/test_semi24_linear.py.
"""
import pytest
import torch

from sparse_t5 import CSRWeight, Semi24Weight, SparseLinear
from sparse_t5.formats import index_dtype_for, semi24_magnitude_mask, validate_csr, validate_semi24


# ---- CSR -------------------------------------------------------------------------------------------
def valid_triple():
    w = CSRWeight.from_dense(torch.randn(4, 6), torch.tensor([[1, 0, 1, 0, 0, 1],
                                                             [0, 0, 0, 0, 0, 0],
                                                             [1, 1, 0, 0, 1, 0],
                                                             [0, 0, 0, 1, 0, 0]], dtype=torch.bool))
    return w.values, w.row_ptr, w.col_idx, (4, 6)


def corrupt(field, fn):
    values, row_ptr, col_idx, shape = valid_triple()
    parts = {"values": values.clone(), "row_ptr": row_ptr.clone(), "col_idx": col_idx.clone()}
    parts[field] = fn(parts[field])
    return parts["values"], parts["row_ptr"], parts["col_idx"], shape


@pytest.mark.parametrize("field,fn,exc,message", [
    ("row_ptr", lambda t: t[:-1], ValueError, "row_ptr has length"),
    ("row_ptr", lambda t: torch.tensor([0, 3, 2, 6, 7], dtype=torch.int32), ValueError, "not monotone"),
    ("row_ptr", lambda t: t + 1, ValueError, r"row_ptr\[0\] must be 0"),
    ("row_ptr", lambda t: torch.tensor([0, 3, 3, 6, 6], dtype=torch.int32), ValueError, "must equal nnz"),
    # (edited in int32: torch has no where() for uint16; -1 stored in uint16 wraps to 65535)
    ("col_idx", lambda t: torch.where(torch.arange(len(t)) == 1, 7, t.int()).to(t.dtype), ValueError, "outside"),
    ("col_idx", lambda t: torch.where(torch.arange(len(t)) == 0, -1, t.int()).to(t.dtype), ValueError, "outside"),
    ("col_idx", lambda t: torch.where(torch.arange(len(t)) == 0, -1, t.int()).to(torch.int16), ValueError, "outside"),
    ("col_idx", lambda t: t[[1, 0, 2, 3, 4, 5, 6]], ValueError, "unsorted"),
    ("col_idx", lambda t: t[[0, 0, 2, 3, 4, 5, 6]], ValueError, "duplicated"),
    ("col_idx", lambda t: t[:-1], ValueError, "col_idx has 6 entries"),
    ("values", lambda t: t[:-1], ValueError, "col_idx has 7 entries but values has 6"),
    ("values", lambda t: t.to(torch.int32), TypeError, "values dtype"),
    ("row_ptr", lambda t: t.to(torch.int64), TypeError, "row_ptr must be int32"),
    ("col_idx", lambda t: t.to(torch.int64), TypeError, "col_idx must be uint16, int16 or int32"),
])
def test_format_validation_names_the_fault(field, fn, exc, message):
    validate_csr(*valid_triple())  # the unmodified triple is valid
    with pytest.raises(exc, match=message):
        validate_csr(*corrupt(field, fn))


@pytest.mark.parametrize("in_features,expected", [(6, torch.uint16), (65536, torch.uint16), (65537, torch.int32)])
def test_index_dtype_is_the_narrowest_that_addresses_the_columns(in_features, expected):
    assert index_dtype_for(in_features) == expected


def test_index_width_is_checked_for_each_index_dtype():
    values, row_ptr, col_idx, _ = valid_triple()
    assert col_idx.dtype == torch.uint16
    validate_csr(values, row_ptr, col_idx.to(torch.int16), (4, 6))  # legacy int16 checkpoints stay valid
    validate_csr(values, row_ptr, col_idx.to(torch.int32), (4, 65537))
    validate_csr(values, row_ptr, col_idx, (4, 65536))
    with pytest.raises(ValueError, match="uint16 col_idx addresses at most 65536 columns"):
        validate_csr(values, row_ptr, col_idx, (4, 65537))
    with pytest.raises(ValueError, match="int16 col_idx addresses at most 32768 columns"):
        validate_csr(values, row_ptr, col_idx.to(torch.int16), (4, 32769))
    with pytest.raises(ValueError, match="uint16 col_idx addresses at most 65536"):
        CSRWeight.from_dense(torch.randn(2, 65537), index_dtype=torch.uint16)
    with pytest.raises(TypeError, match="index_dtype must be one of"):
        CSRWeight.from_dense(torch.randn(2, 6), index_dtype=torch.int64)


def test_from_dense_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        CSRWeight.from_dense(torch.randn(3, 4, 5))
    with pytest.raises(ValueError, match="mask shape"):
        CSRWeight.from_dense(torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype"):
        CSRWeight.from_dense(torch.ones(3, 4, dtype=torch.int64))


# ---- 2:4 -------------------------------------------------------------------------------------------
def test_magnitude_mask_keeps_two_largest_of_four():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 9.0, -8.0, 0.0, 1.0]])
    assert semi24_magnitude_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]


def test_format_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 20, generator=g)
    s = Semi24Weight.from_dense(w)
    assert s.values.shape == (6, 10) and s.meta.shape == (6, 3) and s.meta.dtype == torch.uint8
    assert torch.equal(s.to_dense(), w * semi24_magnitude_mask(w))
    # nibble layout: positions (p0, p1) as p0 | p1 << 2, group g in byte g // 2, even g low
    first_group = semi24_magnitude_mask(w)[0, :4].nonzero().flatten().tolist()
    assert int(s.meta[0, 0] & 0xF) == first_group[0] | (first_group[1] << 2)
    assert int(s.meta[0, 2] >> 4) == 0  # 5 groups: the last byte's high nibble is unused


def test_non_multiple_of_four_is_rejected():
    with pytest.raises(ValueError, match="divisible by 4"):
        Semi24Weight.from_dense(torch.randn(3, 10))
    with pytest.raises(ValueError, match="divisible by 4"):
        SparseLinear.from_dense(torch.randn(3, 10), format="2:4")


def test_mask_must_be_two_of_four():
    w = torch.randn(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="not 2:4"):
        Semi24Weight.from_dense(w, mask)


@pytest.mark.parametrize("corruption,message", [
    (lambda m: m.fill_(0x11), "malformed meta"),          # positions (1, 0): not increasing
    (lambda m: m.fill_(0x55), "malformed meta"),          # positions (1, 1): duplicated
    (lambda m: m[:, -1].fill_(0x44), "unused high nibble"),
])
def test_malformed_meta_is_rejected(corruption, message):
    s = Semi24Weight.from_dense(torch.randn(3, 20))
    meta = s.meta.clone()
    corruption(meta)
    with pytest.raises(ValueError, match=message):
        validate_semi24(s.values, meta, s.shape)
    with pytest.raises(ValueError, match="malformed 2:4 meta"):  # and the C++ op never reads it
        torch.ops.sparse_t5.semi24_linear(torch.randn(2, 20), s.values, meta)
