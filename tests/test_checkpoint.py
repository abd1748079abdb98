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


# ---- checkpoints larger than memory: the streaming writer (benches/test_bench_big_models.py) ----------
def big_shape_config(**overrides):
    """A small stand-in for t5-3b/t5-11b's proportions (d_ff 16 x d_model, heads x d_kv > d_model)."""
    return T5Config(**{**dict(vocab_size=96, d_model=32, d_ff=512, num_heads=8, d_kv=8, num_layers=2,
                              num_decoder_layers=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
                       **overrides})


@pytest.mark.parametrize("ffn", [dict(feed_forward_proj="relu"),
                                 dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)])
def test_random_init_tensors_are_init_weights_one_module_at_a_time(ffn):
    from sparse_t5.checkpoint import tensors_to_save
    from sparse_t5.modeling_t5 import random_init_tensors

    config = big_shape_config(**ffn)
    with torch.device("meta"):
        whole = SparseT5ForConditionalGeneration(config)
    whole.to_empty(device="cpu")
    torch.manual_seed(0)
    whole.init_weights()
    reference = tensors_to_save(whole)
    torch.manual_seed(0)
    streamed = list(random_init_tensors(config))
    assert [n for n, _ in streamed] != [] and sorted(n for n, _ in streamed) == sorted(reference)
    for name, tensor in streamed:
        assert torch.equal(tensor, reference[name]), name


def test_random_init_has_hfs_scale():
    """Per tensor, the standard deviation (or the constant) of HF's own random init: q at
    (d_model d_kv)^-1/2, k/v at d_model^-1/2, o at (heads d_kv)^-1/2, wi at d_model^-1/2, wo at d_ff^-1/2,
    embeddings and an untied lm_head at 1, layer norms at 1. The sampling error of a std is at most about
    4% here (the relative attention bias: 256 draws; the rest 4,096 or more); exchanging any two of
    the formulas changes a std by a factor of 1.4 or more."""
    from sparse_t5.modeling_t5 import random_init_tensors

    config = big_shape_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_model=64, d_kv=16)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(config).state_dict()
    torch.manual_seed(1)
    for name, tensor in random_init_tensors(config):
        if name.endswith("layer_norm.weight"):
            assert torch.equal(tensor, hf[name]), name
        else:
            assert abs(tensor.std().item() / hf[name].std().item() - 1) < 0.1, name


def test_streamed_sharded_checkpoint_is_what_transformers_writes_and_loads(tmp_path):
    from sparse_t5.checkpoint import write_sharded
    from sparse_t5.modeling_t5 import random_init_tensors

    config = big_shape_config(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    path = tmp_path / "big"
    config.save_pretrained(path)
    torch.manual_seed(0)
    index = write_sharded(str(path), random_init_tensors(config), max_shard_bytes=64 * 2**10)
    torch.manual_seed(0)
    written = dict(random_init_tensors(config))
    shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not [f for f in os.listdir(path) if f.startswith(".tmp")]
    umask = os.umask(0)
    os.umask(umask)
    assert all(os.stat(path / f).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(path))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in written.values())
    assert json.load(open(path / "model.safetensors.index.json")) == index
    # transformers reads it as one of its own checkpoints
    hf = T5ForConditionalGeneration.from_pretrained(path)
    for name, tensor in written.items():
        assert torch.equal(hf.state_dict()[name], tensor), name
    # prune-at-load streams the shards, global threshold included, exactly as load-then-sparsify
    reference = SparseT5ForConditionalGeneration.from_pretrained(path)
    reference.sparsify(0.9, scope="global")
    assert_identical(SparseT5ForConditionalGeneration.from_pretrained(path, sparsity=0.9, scope="global"), reference)
    # bf16 on disk (t5-11b's option when the disk is short): half the bytes, and it loads, as transformers
    # does without torch_dtype, into fp32 parameters (recovery's master weights) or, asked, into bf16
    torch.manual_seed(0)
    small = write_sharded(str(tmp_path / "bf16"), random_init_tensors(config, torch.bfloat16),
                          max_shard_bytes=64 * 2**10)
    config.save_pretrained(tmp_path / "bf16")
    assert small["metadata"]["total_size"] * 2 == index["metadata"]["total_size"]
    rounded = written["decoder.block.1.layer.2.DenseReluDense.wi_1.weight"]
    for dtype in (None, torch.bfloat16):
        loaded = SparseT5ForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=dtype)
        wi_1 = loaded.decoder.block[1].layer[2].DenseReluDense.wi_1.weight
        assert wi_1.dtype == (dtype or torch.float32)
        assert torch.equal(wi_1, rounded.to(torch.bfloat16).to(wi_1.dtype))


def test_an_interrupted_streamed_write_is_never_a_checkpoint(tmp_path):
    from sparse_t5.checkpoint import write_sharded
    from sparse_t5.modeling_t5 import random_init_tensors

    config = big_shape_config()
    config.save_pretrained(tmp_path)

    def dies_halfway():
        for i, item in enumerate(random_init_tensors(config)):
            if i == 10:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        write_sharded(str(tmp_path), dies_halfway(), max_shard_bytes=16 * 2**10)
    assert not os.path.exists(tmp_path / "model.safetensors.index.json")
    with pytest.raises(ValueError, match="no model.safetensors"):
        SparseT5ForConditionalGeneration.from_pretrained(tmp_path)


# ---- transformers' Auto classes on our checkpoints (issue 33) ----------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_auto_classes_load_a_compressed_checkpoint_as_the_sparse_model(tmp_path, name):
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from sparse_t5.configuration_t5 import SparseT5Config

    model = SparseT5ForConditionalGeneration.from_pretrained(write_dense(str(tmp_path / "dense"), name, "safetensors"),
                                                             sparsity=0.8).eval()
    model.save_pretrained(tmp_path / "sparse")
    assert json.load(open(tmp_path / "sparse" / "config.json"))["model_type"] == "sparse_t5"
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "sparse"), SparseT5Config)
    auto = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "sparse").eval()
    assert type(auto) is SparseT5ForConditionalGeneration
    ids, labels = torch.tensor([[3, 4, 5, 6, 1]]), torch.tensor([[7, 8, 1]])
    assert torch.equal(auto(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits)
    # Densified, it is a T5 checkpoint again: model_type "t5", which HF's own class loads whole.
    model.densify().save_pretrained(tmp_path / "densified")
    assert json.load(open(tmp_path / "densified" / "config.json"))["model_type"] == "t5"
    hf = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "densified").eval()
    assert type(hf) is T5ForConditionalGeneration
    assert torch.allclose(hf(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits,
                          atol=1e-5)


def test_without_sparse_t5_the_auto_classes_refuse_a_compressed_checkpoint(tmp_path):
    """Not a dense T5 with newly initialised sparse layers: transformers does not know model_type
    sparse_t5 until sparse_t5 registers it."""
    model = SparseT5ForConditionalGeneration.from_pretrained(write_dense(str(tmp_path / "dense"), "v1_relu_tied",
                                                                        "safetensors"), sparsity=0.8)
    model.save_pretrained(tmp_path / "sparse")
    code = ("import sys\nfrom transformers import AutoModelForSeq2SeqLM\n"
            "try:\n    AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1])\nexcept ValueError as e:\n"
            "    print('refused:', e)\nelse:\n    print('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sparse")], capture_output=True, text=True,
                         timeout=300)
    assert "refused:" in out.stdout and "sparse_t5" in out.stdout, out.stdout + out.stderr
