"""The config of a checkpoint with compressed (sparse) layers, and its place in transformers' Auto
classes.

A compressed checkpoint is not a T5ForConditionalGeneration checkpoint: its sparse layers are stored
as values + index (checkpoint.py), not as `weight`. With T5's own model_type ("t5") in config.json,
`AutoModelForSeq2SeqLM.from_pretrained` built HF's dense T5 and newly initialised every sparse layer,
saying only MISSING/UNEXPECTED (measured under 5.24: logits off by 3.3 on a tiny model at 0.8). So a
checkpoint that holds sparse layers is saved with its own model_type, "sparse_t5":
  - after `import sparse_t5`, the Auto classes (AutoConfig, AutoModelForSeq2SeqLM) load it as
    SparseT5ForConditionalGeneration (register_auto_classes, called when modeling_t5 is imported);
  - without it, transformers refuses the unknown model type with an error, never a half-loaded model.
A checkpoint with no sparse layer stays a plain "t5" checkpoint that HF's own class loads.
"""
from __future__ import annotations

from transformers import T5Config


class SparseT5Config(T5Config):
    """T5Config of a checkpoint that holds compressed layers (see the module docstring). Every
    field is T5's; the layout of the sparse layers travels in the `sparse_t5` field that
    checkpoint.save_pretrained writes."""

    model_type = "sparse_t5"


def as_saved(config: T5Config, has_sparse_layers: bool) -> T5Config:
    """`config` (a copy to be written) with the class whose model_type says what the checkpoint
    holds: SparseT5Config with sparse layers, T5Config without."""
    config.__class__ = SparseT5Config if has_sparse_layers else T5Config
    return config


def register_auto_classes() -> None:
    """Map model_type "sparse_t5" to our config and model in transformers' Auto classes."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from .modeling_t5 import SparseT5ForConditionalGeneration

    AutoConfig.register(SparseT5Config.model_type, SparseT5Config, exist_ok=True)
    AutoModelForSeq2SeqLM.register(SparseT5Config, SparseT5ForConditionalGeneration, exist_ok=True)
