"""The structural memory claim behind the project, on a tiny T5 (fast; the measured figures are in
benches/test_bench_recovery.py):

- at sparsity s, the optimizer state of the sparse layers has (1 - s) times the elements a dense
  model's would have;
- no dense copy of a sparse weight exists at any point of a training step (forward, backward,
  optimizer), checked on every tensor the step allocates.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import T5Config

from sparse_t5 import SparseT5ForConditionalGeneration


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=97, d_model=48, d_kv=8, num_heads=4, d_ff=112, num_layers=2,
                      decoder_start_token_id=0, dropout_rate=0.1, feed_forward_proj="gated-gelu")
    return SparseT5ForConditionalGeneration(config)


def batch():
    g = torch.Generator().manual_seed(1)
    # 33 and 15 tokens: no activation shape can coincide with a weight shape (48, 112, 32)
    return torch.randint(2, 97, (3, 11), generator=g), torch.randint(2, 97, (3, 5), generator=g)


class RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("fmt,sparsity", [("csr", 0.2), ("csr", 0.5), ("csr", 0.9), ("2:4", 0.5)])
def test_optimizer_state_scales_with_density_and_no_dense_copy_exists(fmt, sparsity):
    model = tiny_model()
    if fmt == "2:4":
        model.sparsify(format="2:4")
    else:
        model.sparsify(sparsity, scope="layer")
    layers = model.sparse_layers()
    assert layers
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    ids, labels = batch()
    model.train()
    dense_shapes = set()
    for m in layers.values():
        dense_shapes |= {(m.out_features, m.in_features), (m.in_features, m.out_features),
                         (m.out_features * m.in_features,)}
    with RecordShapes() as rec:
        for _ in range(2):
            optimizer.zero_grad()
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
    assert rec.shapes, "the recorder saw no tensors"
    offending = sorted({s for s in rec.shapes if s in dense_shapes})
    assert not offending, f"dense-shaped tensors of sparse layers were allocated: {offending}"

    for name, m in layers.items():
        state = optimizer.state[m.values]
        dense_elements = m.in_features * m.out_features
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].numel() == m.nnz == round((1 - sparsity) * dense_elements), (name, key)
        assert m.values.grad.numel() == m.nnz
    total_dense = sum(m.in_features * m.out_features for m in layers.values())
    total_state = sum(optimizer.state[m.values]["exp_avg"].numel() for m in layers.values())
    assert total_state == pytest.approx((1 - sparsity) * total_dense, abs=len(layers))
