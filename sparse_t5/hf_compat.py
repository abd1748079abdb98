"""Differences between the transformers releases sparse-t5 supports, in one place.

Each difference is a feature test (a field, an attribute), never a version comparison, with the
release that introduced it in a comment, as transformers' own `utils/import_utils.py` and PEFT's
`import_utils.py` do. modeling_t5.py asks this module and never looks at a version itself. The one
version comparison here is the warning about an untested release, which is about the tested range,
not about behaviour.

The tested range is TESTED_TRANSFORMERS: the oldest release we support (HF's 4.49 test tree runs in
the peer suite, scripts/peer_suite.py) and the newest release the test suite ran against. The
constraints file (constraints.txt) pins the newest for `make test` and `make demo`.
"""
from __future__ import annotations

import dataclasses
import warnings

import transformers
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import Seq2SeqLMOutput

# Oldest and newest transformers the whole test suite and HF's own T5 suite (peer run) passed with.
TESTED_TRANSFORMERS = ("4.49.0", "5.25.0")

# transformers 5.24 renamed the cache keyword of forward / generate and the cache field of the
# model outputs from `past_key_values` to `cache` (the old name is deprecated until 5.40).
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(Seq2SeqLMOutput)} else "past_key_values"

# Tuples of per-layer (key, value[, cross key, cross value]) tensors, the cache format before Cache
# classes: accepted by 4.x (EncoderDecoderCache.from_legacy_cache, deprecated there), removed in 5.0.
LEGACY_TUPLE_CACHE = hasattr(EncoderDecoderCache, "from_legacy_cache")


# Class attributes mirrored from HF's own T5 of the installed release, so that what transformers'
# machinery reads from our class (config._attn_implementation, tied-weight keys) is what it accepts for
# T5: 4.49 and 5.4's T5 have no SDPA path (a config saying "sdpa" makes HF's T5 classes raise), 5.24's
# does; 4.x lists tied weights, 5.0 maps each tied weight to its source.
from transformers import T5ForConditionalGeneration as _HFT5  # noqa: E402

HF_T5_SUPPORTS_SDPA = bool(getattr(_HFT5, "_supports_sdpa", False))
HF_T5_TIED_WEIGHTS_KEYS = _HFT5._tied_weights_keys


# 4.52: decoder layers derive from GradientCheckpointingLayer, which checkpoints its own forward when
# gradient checkpointing is on (5.x enables it only on such layers). Before, the stack wraps each block.
try:
    from transformers.modeling_layers import GradientCheckpointingLayer as CheckpointedLayer
except ImportError:  # 4.49 - 4.51
    from torch.nn import Module as CheckpointedLayer
LAYERS_CHECKPOINT_THEMSELVES = CheckpointedLayer.__name__ == "GradientCheckpointingLayer"


class EncoderMaskInGeneration:
    """Mixed in before GenerationMixin: its prepare_inputs_for_generation, plus the encoder's padding
    mask for cross-attention, which transformers 4.49.0's generic version drops for encoder-decoder
    models (transformers#36293, fixed in 4.50: padded rows then attend to their padding, in HF's own
    T5 too). Where transformers passes the mask itself this changes nothing."""

    def prepare_inputs_for_generation(self, *args, attention_mask=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None and inputs.get("attention_mask") is None:
            inputs["attention_mask"] = attention_mask
        return inputs


def cache_output(cache) -> dict:
    """The cache as a model output field: {'cache': ...} from 5.24 on, {'past_key_values': ...} before."""
    return {CACHE_NAME: cache}


def cached_kv(cache: Cache, layer_idx: int):
    """Key and value tensors a cache holds for one layer (cross-attention reuse)."""
    if hasattr(cache, "layers"):  # 4.56: caches hold a list of layer objects
        return cache.layers[layer_idx].keys, cache.layers[layer_idx].values
    return cache.key_cache[layer_idx], cache.value_cache[layer_idx]


def as_encoder_decoder_cache(cache):
    """The decoder's cache as an EncoderDecoderCache, and how to hand it back to the caller.

    Returns (cache, give_back): give_back maps the cache after the forward to what this caller expects,
    as HF's T5Stack does: an EncoderDecoderCache comes back as it is; a plain self-attention Cache gets a
    fresh cross-attention cache and only its self-attention part is returned; a legacy tuple (4.x only)
    is converted and returned as a tuple again.
    """
    if cache is None or isinstance(cache, EncoderDecoderCache):
        return cache, lambda c: c
    if isinstance(cache, Cache):
        return EncoderDecoderCache(cache, DynamicCache()), lambda c: c.self_attention_cache
    if isinstance(cache, (tuple, list)):
        if not LEGACY_TUPLE_CACHE:
            raise TypeError(f"a tuple cache is not supported by transformers {transformers.__version__} "
                            "(removed in 5.0): pass an EncoderDecoderCache")
        return EncoderDecoderCache.from_legacy_cache(cache), lambda c: c.to_legacy_cache()
    raise TypeError(f"cache must be an EncoderDecoderCache, a Cache or None, not {type(cache).__name__}")


def is_static(cache) -> bool:
    """Whether a self-attention cache has a fixed length (StaticCache and its kin), so that keys come
    back padded to the cache's length and the mask must hide the slots not written yet."""
    return bool(getattr(cache, "is_compileable", False))


def static_length(cache) -> int:
    """The fixed key length of a static self-attention cache."""
    if hasattr(cache, "get_max_cache_shape"):  # 4.48 to 5.x: on the cache
        shape = cache.get_max_cache_shape()
        return shape if isinstance(shape, int) else shape[0]
    if hasattr(cache, "max_cache_len"):
        return cache.max_cache_len
    return cache.layers[0].max_cache_len  # 5.2x: only the layers know it


def empty_loading_info() -> dict:
    """from_pretrained(output_loading_info=True)'s report for a strict load: nothing missing or unexpected.
    5.x reports sets (transformers.utils.loading_report.LoadStateDictInfo), 4.x lists."""
    try:
        from transformers.utils.loading_report import LoadStateDictInfo  # noqa: F401
        empty = set
    except ImportError:
        empty = list
    return {"missing_keys": empty(), "unexpected_keys": empty(), "mismatched_keys": empty(), "error_msgs": []}


def use_return_dict(config) -> bool:
    # 4.x's config.use_return_dict, computed: 5.x deprecates that property (a warning on every forward)
    # and drops torchscript.
    return bool(config.return_dict and not getattr(config, "torchscript", False))


def check_tested_version(version: str | None = None) -> None:
    """Warn (on import) when transformers (or `version`) is outside the tested range."""
    from packaging.version import Version

    version = version or transformers.__version__
    installed = Version(version)
    oldest, newest = (Version(v) for v in TESTED_TRANSFORMERS)
    if installed.release > newest.release:
        warnings.warn(f"sparse_t5 was tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}; "
                      f"{version} is newer and untested (pin it with constraints.txt, or run "
                      "`make compat` to check it)", UserWarning, stacklevel=3)
    elif installed.release < oldest.release:
        warnings.warn(f"sparse_t5 needs transformers >= {TESTED_TRANSFORMERS[0]}; {version} is older "
                      "and untested", UserWarning, stacklevel=3)


# Keywords transformers' Auto classes and pipelines pass to a model class's from_pretrained that say
# how it was called, not what to load: _from_auto, _from_pipeline, trust_remote_code and
# adapter_kwargs (4.x and 5.x; adapter_kwargs carries the hub token/revision even without an
# adapter), code_revision and _commit_hash (4.x). A PEFT adapter itself (`_adapter_model_path`, set
# when the path holds one) is not supported and raises.
AUTO_LOADER_KEYWORDS = ("_from_auto", "_from_pipeline", "trust_remote_code", "adapter_kwargs", "code_revision",
                        "_commit_hash")


def drop_auto_loader_keywords(kwargs: dict) -> None:
    adapter = kwargs.get("adapter_kwargs") or {}
    if "_adapter_model_path" in adapter:
        raise NotImplementedError("sparse_t5 does not load PEFT adapters: load the base model, then the adapter")
    for key in AUTO_LOADER_KEYWORDS:
        kwargs.pop(key, None)
