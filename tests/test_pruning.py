"""Pruning (sparse_t5/pruning.py, sparse_t5/sparsify.py).

- The exact top-k by magnitude behind every magnitude pruning (pruning.keep_top_k), against a sort:
  the same k kept, ties at the threshold broken by position across tensors, signs ignored, and the
  same answer however the tensors are cut into slices (CHUNK) to bound the selection's memory.
- Pruning the T5 model: targets, scopes, repruning, argument checks, the cubic schedule and gradual
  pruning during training. Prune-at-load against load-then-sparsify: tests/test_checkpoint.py.
"""
import pytest
import torch
from test_modeling_t5 import load_ours, make_hf, train_curve
from torch import nn

from sparse_t5 import pruning
from sparse_t5.pruning import GradualPruner, cubic_sparsity


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


# ---- pruning the T5 model ----------------------------------------------------------------------------
def test_sparsify_targets_and_frees_dense_weights(tmp_path):
    ours = load_ours(make_hf("v11_gated_untied"), tmp_path)
    ours.sparsify(0.7)
    sparse = ours.sparse_layers()
    names = set(sparse)
    assert all(n.split(".")[-1] in {"q", "k", "v", "o", "wi_0", "wi_1", "wo"} for n in names)
    assert len(names) == 2 * (4 + 3) + 2 * (4 + 4 + 3)  # encoder: attn + ffn; decoder: self + cross + ffn
    assert isinstance(ours.lm_head, nn.Linear) and isinstance(ours.shared, nn.Embedding)
    # no dense weight of a sparse layer remains anywhere in the model
    dense_shapes = {(m.out_features, m.in_features) for m in sparse.values()}
    for name, t in list(ours.named_parameters()) + list(ours.named_buffers()):
        assert tuple(t.shape) not in dense_shapes, name
    # parameter + buffer bytes follow the CSR formula: fp32 values, int16 columns, int32 row_ptr
    for m in sparse.values():
        assert m.memory_bytes() == m.nnz * (4 + 2) + (m.out_features + 1) * 4
        assert m.sparsity == pytest.approx(0.7, abs=1.0 / (m.in_features * m.out_features))


def test_sparsify_include_exclude_and_global_scope(tmp_path):
    ours = load_ours(make_hf("v1_relu_tied"), tmp_path)
    ours.sparsify(0.5, include=r"DenseReluDense\.wi$", scope="global")
    assert set(n.split(".")[-1] for n in ours.sparse_layers()) == {"wi"}
    ours2 = load_ours(make_hf("v1_relu_tied"), tmp_path)
    ours2.sparsify(0.6, scope="global", exclude=r"EncDecAttention")
    layers = ours2.sparse_layers()
    assert not any("EncDecAttention" in n for n in layers)
    total = sum(m.in_features * m.out_features for m in layers.values())
    assert sum(m.nnz for m in layers.values()) == round(0.4 * total)
    assert len({round(m.sparsity, 3) for m in layers.values()}) > 1  # global: layers differ


def test_repruning_shrinks_and_never_densifies(tmp_path):
    ours = load_ours(make_hf("v1_relu_tied"), tmp_path)
    ours.sparsify(0.5)
    layer = ours.encoder.block[0].layer[1].DenseReluDense.wi
    nnz_half, kept_before = layer.nnz, layer.to_dense()
    ours.sparsify(0.8)
    assert ours.encoder.block[0].layer[1].DenseReluDense.wi is layer  # same module, shrunk in place
    assert layer.nnz < nnz_half
    assert torch.all(kept_before[layer.mask()] == layer.to_dense()[layer.mask()])  # survivors unchanged
    assert torch.all(layer.mask() <= (kept_before != 0))  # no pruned position came back
    nnz = layer.nnz
    ours.sparsify(0.3)  # lower target: nothing grows back
    assert layer.nnz == nnz


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsify_rejects_bad_sparsity(tmp_path, bad):
    ours = load_ours(make_hf("v1_relu_tied"), tmp_path)
    with pytest.raises(ValueError, match="sparsity"):
        ours.sparsify(bad)


def test_sparsify_rejects_unknown_format_and_scope(tmp_path):
    ours = load_ours(make_hf("v1_relu_tied"), tmp_path)
    with pytest.raises(ValueError, match="unknown sparse format"):
        ours.sparsify(0.5, format="bsr")
    with pytest.raises(ValueError, match="scope"):
        ours.sparsify(0.5, scope="model")


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.9, 10, 110) == 0.0
    assert cubic_sparsity(10, 0.9, 10, 110) == 0.0
    assert cubic_sparsity(60, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert cubic_sparsity(110, 0.9, 10, 110) == pytest.approx(0.9)
    assert cubic_sparsity(500, 0.9, 10, 110) == pytest.approx(0.9)


def test_gradual_pruning_during_training_remaps_optimizer(tmp_path):
    ours = load_ours(make_hf("v1_relu_tied"), tmp_path)
    pruner = GradualPruner(ours, final_sparsity=0.8, start_step=2, end_step=12, frequency=5, scope="global")
    nnz_history = []

    def on_step(step, opt):
        if pruner.step(step, opt) is not None:
            nnz_history.append(sum(m.nnz for m in ours.sparse_layers().values()))
            for m in ours.sparse_layers().values():
                state = opt.state.get(m.values)
                assert state is None or state["exp_avg"].shape == m.values.shape
            params = {id(p) for g in opt.param_groups for p in g["params"]}
            assert all(id(m.values) in params for m in ours.sparse_layers().values())

    losses = train_curve(ours, steps=16, on_step=on_step)
    assert [s for s, _ in pruner.history] == [2, 7, 12]
    assert nnz_history == sorted(nnz_history, reverse=True) and len(set(nnz_history)) == 3
    total = sum(m.in_features * m.out_features for m in ours.sparse_layers().values())
    assert sum(m.nnz for m in ours.sparse_layers().values()) == round(0.2 * total)
    assert all(torch.isfinite(torch.tensor(losses)))
