"""Checkpoint I/O (sparse_t5/checkpoint.py): prune-at-load, streaming, and its memory bound.

- prune-at-load gives exactly what loading dense and calling `sparsify` gives (same masks,
  bit-identical tensors): layer and global scope, CSR and 2:4, safetensors, .bin and sharded
  checkpoints, with ties at the global threshold across layers;
- its peak memory, in a fresh process, stays within the compressed model + 2 x the largest tensor
  + a small constant, while loading the same checkpoint dense exceeds that by the dense size.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from sparse_t5 import SparseT5ForConditionalGeneration

CONFIGS = {
    "v1_relu_tied": dict(d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=2, feed_forward_proj="relu"),
    "v11_gated_untied": dict(d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=2, num_decoder_layers=3,
                             feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def write_dense(path, name, kind, quantised=False):
    torch.manual_seed(0)
    config = T5Config(vocab_size=64, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      **CONFIGS[name])
    hf = T5ForConditionalGeneration(config)
    if quantised:  # few distinct magnitudes: many ties at any threshold, across layers
        with torch.no_grad():
            for p in hf.parameters():
                p.copy_((p * 8).round() / 8)
    if kind == "safetensors":
        hf.save_pretrained(path)
    elif kind == "sharded":
        hf.save_pretrained(path, max_shard_size="20KB")
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    elif kind in ("bin", "sharded_bin"):
        hf.save_pretrained(path)
        os.remove(os.path.join(path, "model.safetensors"))
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if kind == "bin":
            torch.save(state, os.path.join(path, "pytorch_model.bin"))
        else:
            names = sorted(state)
            shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
            for shard, keys in shards.items():
                torch.save({k: state[k] for k in keys}, os.path.join(path, shard))
            index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
            json.dump(index, open(os.path.join(path, "pytorch_model.bin.index.json"), "w"))
    return path


def assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert a.config.sparse_t5 == b.config.sparse_t5


@pytest.mark.parametrize("kind", ["safetensors", "sharded", "bin", "sharded_bin"])
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("setting", [dict(sparsity=0.7, scope="layer"), dict(sparsity=0.7, scope="global"),
                                     dict(format="2:4")])
def test_prune_at_load_equals_load_then_sparsify(tmp_path, kind, name, setting):
    path = write_dense(str(tmp_path / "dense"), name, kind)
    reference = SparseT5ForConditionalGeneration.from_pretrained(path)
    reference.sparsify(**setting)
    pruned = SparseT5ForConditionalGeneration.from_pretrained(path, **setting)
    assert_identical(pruned, reference)
    # and it round-trips as any sparse checkpoint does
    pruned.save_pretrained(tmp_path / "sparse")
    assert_identical(SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "sparse"), reference)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_ties_at_the_threshold_are_broken_the_same_way(tmp_path, scope):
    path = write_dense(str(tmp_path / "dense"), "v1_relu_tied", "safetensors", quantised=True)
    for sparsity in (0.3, 0.55, 0.8):
        reference = SparseT5ForConditionalGeneration.from_pretrained(path)
        reference.sparsify(sparsity, scope=scope)
        pruned = SparseT5ForConditionalGeneration.from_pretrained(path, sparsity=sparsity, scope=scope)
        assert_identical(pruned, reference)
        total = sum(m.in_features * m.out_features for m in pruned.sparse_layers().values())
        assert sum(m.nnz for m in pruned.sparse_layers().values()) == pytest.approx((1 - sparsity) * total, abs=1 + (
            0 if scope == "global" else len(pruned.sparse_layers())))


def test_prune_at_load_of_a_sparse_checkpoint_prunes_further(tmp_path):
    path = write_dense(str(tmp_path / "dense"), "v1_relu_tied", "safetensors")
    half = SparseT5ForConditionalGeneration.from_pretrained(path, sparsity=0.5, scope="global")
    half.save_pretrained(tmp_path / "half")
    reference = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "half")
    reference.sparsify(0.8, scope="global")
    assert_identical(SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "half", sparsity=0.8,
                                                                      scope="global"), reference)


def test_prune_at_load_rejects_bad_arguments(tmp_path):
    path = write_dense(str(tmp_path / "dense"), "v1_relu_tied", "safetensors")
    for kwargs, message in ((dict(sparsity=1.5), "sparsity must be in"), (dict(format="3:8"), "unknown sparse format"),
                            (dict(sparsity=0.5, scope="row"), "scope must be"),
                            (dict(sparsity=0.5, include="nothing-matches"), "no Linear layer")):
        with pytest.raises(ValueError, match=message):
            SparseT5ForConditionalGeneration.from_pretrained(path, **kwargs)


MEMORY_WORKER = r"""
import json, sys, torch
from sparse_t5 import SparseT5ForConditionalGeneration
from sparse_t5.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
path, tiny, mode = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = dict(sparsity=0.9, scope="global") if mode == "prune" else {}
# The first load pays one-off costs (lazy imports: about 100 MB of RSS under transformers 4.49) that
# are not the load's memory: load a tiny checkpoint the same way first, then measure the load alone.
SparseT5ForConditionalGeneration.from_pretrained(tiny, **kwargs)
base = current_rss_bytes(); reset_peak_rss()
model = SparseT5ForConditionalGeneration.from_pretrained(path, **kwargs)
peak = peak_rss_bytes() - base
held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
json.dump({"peak": peak, "model_bytes": held}, sys.stdout)
"""


def test_prune_at_load_peak_memory_stays_within_its_bound(tmp_path):
    """Peak RSS of prune-at-load <= compressed model + 2 x largest tensor + 64 MB; loading the same
    checkpoint dense must exceed the compressed model by most of the dense size (so the measurement
    can tell the two apart)."""
    torch.manual_seed(0)
    config = T5Config(vocab_size=1000, d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "dense")
    tiny = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    T5ForConditionalGeneration(tiny).save_pretrained(tmp_path / "tiny")
    dense_bytes = os.path.getsize(tmp_path / "dense" / "model.safetensors")
    largest = 2048 * 512 * 4

    def measure(mode):
        out = subprocess.run([sys.executable, "-c", MEMORY_WORKER, str(tmp_path / "dense"), str(tmp_path / "tiny"),
                              mode],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout)

    pruned, dense = measure("prune"), measure("dense")
    bound = pruned["model_bytes"] + 2 * largest + 64 * 2**20
    assert pruned["peak"] <= bound, (pruned, bound)
    assert dense["peak"] >= pruned["model_bytes"] + 0.8 * (dense_bytes - pruned["model_bytes"]), (dense, dense_bytes)


def test_cli_prune_model_prunes_a_dense_checkpoint_while_loading(tmp_path, capsys):
    from sparse_t5.cli import main

    path = write_dense(str(tmp_path / "dense"), "v11_gated_untied", "safetensors")
    assert main(["dsi", "prune", "--model", path, "--sparsity", "0.6", "--scope", "global",
                 "--output", str(tmp_path / "out")]) == 0
    reference = SparseT5ForConditionalGeneration.from_pretrained(path)
    reference.sparsify(0.6, scope="global")
    assert_identical(SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "out"), reference)
    assert json.loads(capsys.readouterr().out)["layers"] == len(reference.sparse_layers())


def test_placement_arguments_as_transformers_users_pass_them(tmp_path):
    path = write_dense(str(tmp_path / "dense"), "v1_relu_tied", "safetensors")
    for kwargs in ({}, dict(device_map="cpu"), dict(device_map={"": "cpu"}), dict(map_location="cpu"),
                   dict(device="cpu"), dict(device_map="auto")):
        model = SparseT5ForConditionalGeneration.from_pretrained(path, **kwargs)
        expected = "cuda" if kwargs.get("device_map") == "auto" and torch.cuda.is_available() else "cpu"
        assert {p.device.type for p in model.parameters()} == {expected}, kwargs
    with pytest.raises(ValueError, match="splits the model across devices"):
        SparseT5ForConditionalGeneration.from_pretrained(path, device_map={"encoder": "cpu", "decoder": "cpu"})
    with pytest.raises(ValueError, match="conflicting placements"):
        SparseT5ForConditionalGeneration.from_pretrained(path, device_map="cpu", map_location="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            SparseT5ForConditionalGeneration.from_pretrained(path, device_map="cuda")
