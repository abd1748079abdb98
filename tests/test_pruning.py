"""The exact top-k by magnitude behind every magnitude pruning (sparse_t5.pruning.keep_top_k), against a
sort: the same k kept, ties at the threshold broken by position across tensors, signs ignored, and the
same answer however the tensors are cut into slices (CHUNK) to bound the selection's memory."""
import pytest
import torch

from sparse_t5 import pruning


def reference_masks(tensors, k):
    """Keep the k largest |x| over all tensors in order, earlier positions first among equals."""
    flat = torch.cat([t.reshape(-1).float().abs() for t in tensors])
    order = torch.sort(-flat, stable=True).indices[:k]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order] = True
    return list(keep.split([t.numel() for t in tensors]))


def quantised(n, levels, generator):
    # few distinct magnitudes, both signs, and -0.0: many ties at any threshold
    x = torch.randint(-levels, levels + 1, (n,), generator=generator).float() / levels
    x[x == 0] = -0.0
    return x


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_top_k_equals_a_stable_sort(monkeypatch, chunk, dtype):
    monkeypatch.setattr(pruning, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    tensors = [quantised(300, 5, g).to(dtype), torch.randn(17, 9, generator=g).to(dtype),
               quantised(256, 3, g).reshape(16, 16).to(dtype), torch.zeros(0, dtype=dtype)]
    total = sum(t.numel() for t in tensors)
    for k in (0, 1, 37, 150, 333, total - 1, total, total + 5):
        masks = pruning.keep_top_k(tensors, k)
        expected = reference_masks(tensors, min(k, total))
        assert [m.dtype for m in masks] == [torch.bool] * len(tensors)
        for got, want in zip(masks, expected):
            assert torch.equal(got, want), (k, chunk)


def test_magnitudes_are_read_from_the_weights_without_changing_them():
    w = torch.tensor([[-3.0, 1.0], [2.0, -0.5]])
    before = w.clone()
    (mask,) = pruning.keep_top_k([w], 2)
    assert mask.tolist() == [True, False, True, False]  # |-3| and |2|: the sign does not count
    assert torch.equal(w, before)
