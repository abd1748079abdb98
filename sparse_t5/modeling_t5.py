"""SparseT5ForConditionalGeneration: a T5 whose Linear layers can be sparse, a drop-in for
Hugging Face's T5ForConditionalGeneration.

Module names are HF's (`shared`, `encoder.block.{i}.layer.{j}.SelfAttention.q`, `EncDecAttention`,
`DenseReluDense.wi / wi_0 / wi_1 / wo`, `layer_norm`, `final_layer_norm`, `lm_head`), so any HF T5
checkpoint (t5, t5 v1.1, flan-t5) loads with no missing or unexpected keys. The math follows HF's
modeling_t5: RMS layer norm without mean or bias, no 1/sqrt(d) attention scaling, relative
position buckets computed by block 0 and shared by the stack, bidirectional in the encoder,
causal in the decoder, decoder output scaled by d_model^-0.5 when the embeddings are tied.

Linear layers start as nn.Linear; `sparsify()` replaces the targeted ones with `SparseLinear`
(weights, gradients and optimizer state for the nonzeros only). Checkpoints written by
`save_pretrained` hold the compressed tensors and the sparsity layout (config key `sparse_t5`);
`from_pretrained` rebuilds that layout on the meta device first, so no dense weight is ever
materialised for a sparse layer. Checkpoint reading and writing, prune-at-load and dense export live
in checkpoint.py; this file is the architecture.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, T5Config
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions, Seq2SeqLMOutput

from . import checkpoint, hf_compat, sparsify
from .configuration_t5 import SparseT5Config, register_auto_classes
from .sparsify import LAYOUT_KEY
from .devices import placement
from .layers import SparseLinear, weight_dtype
from .ops.dense_few_tokens import MAX_TOKENS as _FEW_MAX_TOKENS, dense_linear_few_tokens


def lm_head_is_tied(config: T5Config) -> bool:
    """Whether the decoder output is scaled by d_model^-0.5 and lm_head shares `shared.weight`, as
    in T5 v1 (v1.1 and flan-t5: neither). transformers >= 5 records this as scale_decoder_outputs
    (and always sets tie_word_embeddings). A checkpoint without lm_head.weight shares it anyway
    (see from_pretrained)."""
    return bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings))


def _activation(name: str):
    if name == "relu":
        return F.relu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported dense_act_fn {name!r}")


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction, no bias; variance accumulated in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class T5DenseActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = _activation(config.dense_act_fn)

    def forward(self, hidden_states):
        hidden_states = self.dropout(self.act(self.wi(hidden_states)))
        return self.wo(hidden_states.to(weight_dtype(self.wo)))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.act = _activation(config.dense_act_fn)

    def forward(self, hidden_states):
        hidden_states = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.wo(hidden_states.to(weight_dtype(self.wo)))


class T5LayerFF(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states):
        return hidden_states + self.dropout(self.DenseReluDense(self.layer_norm(hidden_states)))


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Mesh TensorFlow's bucketing of (memory - query) positions: exact for small distances,
    logarithmic up to max_distance, clipped beyond."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool = False, layer_idx: int = 0):
        super().__init__()
        self.is_decoder = config.is_decoder
        self.has_relative_attention_bias = has_relative_attention_bias
        self.relative_attention_num_buckets = config.relative_attention_num_buckets
        self.relative_attention_max_distance = config.relative_attention_max_distance
        self.n_heads = config.num_heads
        self.key_value_proj_dim = config.d_kv
        self.inner_dim = self.n_heads * self.key_value_proj_dim
        self.dropout = config.dropout_rate
        self.layer_idx = layer_idx
        self.q = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, self.inner_dim, bias=False)
        self.o = nn.Linear(self.inner_dim, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.relative_attention_num_buckets, self.n_heads)

    def compute_bias(self, query_positions, key_length, device):
        """[1, heads, len(query_positions), key_length] learned bias for the relative positions."""
        context = query_positions.to(device=device, dtype=torch.long)[:, None]
        memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
        buckets = relative_position_bucket(memory - context, bidirectional=not self.is_decoder,
                                           num_buckets=self.relative_attention_num_buckets,
                                           max_distance=self.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def _split_heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.key_value_proj_dim).transpose(1, 2)

    def forward(self, hidden_states, bias, key_value_states=None, cache=None, output_attentions=False,
                head_mask=None, cache_position=None):
        """bias: [batch or 1, heads or 1, q, k] additive (relative positions + mask).
        cache: the stack's self-attention Cache, or for cross-attention a (Cache, is_updated dict, rows)
        triple, from an EncoderDecoderCache; rows, when not None, is _EncoderRows (the encoder rows
        that beam search repeated, and where). head_mask: [heads] or [batch, heads, q, k]-broadcastable
        multiplier of the attention probabilities (HF's head_mask). cache_position: the positions of
        hidden_states in the sequence, which a static cache writes at."""
        query = self._split_heads(self.q(hidden_states))
        if key_value_states is None:  # self-attention
            key = self._split_heads(self.k(hidden_states))
            value = self._split_heads(self.v(hidden_states))
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, {"cache_position": cache_position})
        else:  # cross-attention: keys/values of the encoder output are computed once per sequence
            cross_cache, is_updated, rows = cache if cache is not None else (None, None, None)
            if cross_cache is not None and is_updated.get(self.layer_idx, False):
                key, value = hf_compat.cached_kv(cross_cache, self.layer_idx)
            else:
                if rows is not None:  # project each distinct encoder row once, not once per beam
                    key_value_states = key_value_states.index_select(0, rows.first)
                key = self._split_heads(self.k(key_value_states))
                value = self._split_heads(self.v(key_value_states))
                if rows is not None:  # back to one row per beam, contiguous (index_select's result is)
                    key, value = key.index_select(0, rows.run), value.index_select(0, rows.run)
                if cross_cache is not None:
                    if not self.training:
                        # Stored contiguous for decoding: every later step's attention reads them, and a
                        # strided [batch, heads, source, d_kv] view of the [batch, source, heads, d_kv]
                        # projection made those reads slower (HF's beam search hides it: its first
                        # reorder copies them). Training keeps the view: one forward reads it once.
                        key, value = key.contiguous(), value.contiguous()
                    key, value = cross_cache.update(key, value, self.layer_idx, {"cache_position": cache_position})
                    is_updated[self.layer_idx] = True
        dropout = self.dropout if self.training else 0.0
        if output_attentions or head_mask is not None:
            scores = torch.matmul(query, key.transpose(2, 3)) + bias
            weights = F.dropout(F.softmax(scores.float(), dim=-1).type_as(scores), p=dropout, training=self.training)
            if head_mask is not None:
                weights = weights * (head_mask.view(1, -1, 1, 1) if head_mask.dim() == 1 else head_mask)
            out = torch.matmul(weights, value)
        else:
            # T5 does not scale q.k by 1/sqrt(d) (it is folded into the initialisation).
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype),
                                                 dropout_p=dropout, scale=1.0)
            weights = None
        out = out.transpose(1, 2).reshape(hidden_states.shape[0], hidden_states.shape[1], self.inner_dim)
        return self.o(out), weights if output_attentions else None


class T5LayerSelfAttention(nn.Module):
    def __init__(self, config, has_relative_attention_bias=False, layer_idx=0):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias, layer_idx)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, bias, cache=None, output_attentions=False, head_mask=None, cache_position=None):
        out, weights = self.SelfAttention(self.layer_norm(hidden_states), bias, cache=cache,
                                          output_attentions=output_attentions, head_mask=head_mask,
                                          cache_position=cache_position)
        return hidden_states + self.dropout(out), weights


class T5LayerCrossAttention(nn.Module):
    def __init__(self, config, layer_idx=0):
        super().__init__()
        self.EncDecAttention = T5Attention(config, has_relative_attention_bias=False, layer_idx=layer_idx)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, hidden_states, key_value_states, bias, cache=None, output_attentions=False, head_mask=None):
        out, weights = self.EncDecAttention(self.layer_norm(hidden_states), bias, key_value_states=key_value_states,
                                            cache=cache, output_attentions=output_attentions, head_mask=head_mask)
        return hidden_states + self.dropout(out), weights


def _clamp_fp16(hidden_states):
    # As HF: keep fp16 activations finite so that fp16 training does not overflow to inf.
    if hidden_states.dtype == torch.float16:
        big = torch.finfo(torch.float16).max
        clamp = torch.where(torch.isinf(hidden_states).any(), big - 1000, big)
        hidden_states = torch.clamp(hidden_states, min=-clamp, max=clamp)
    return hidden_states


class T5Block(hf_compat.CheckpointedLayer):
    """One encoder or decoder layer; with transformers >= 4.52 a GradientCheckpointingLayer, which
    checkpoints itself when gradient checkpointing is on (else T5Stack wraps it)."""

    def __init__(self, config, has_relative_attention_bias=False, layer_idx=0):
        super().__init__()
        self.is_decoder = config.is_decoder
        self.layer = nn.ModuleList([T5LayerSelfAttention(config, has_relative_attention_bias, layer_idx)])
        if self.is_decoder:
            self.layer.append(T5LayerCrossAttention(config, layer_idx))
        self.layer.append(T5LayerFF(config))

    def forward(self, hidden_states, self_bias, encoder_hidden_states=None, cross_bias=None,
                self_cache=None, cross_cache=None, output_attentions=False, head_mask=None, cross_head_mask=None,
                cache_position=None):
        hidden_states, self_weights = self.layer[0](hidden_states, self_bias, cache=self_cache,
                                                    output_attentions=output_attentions, head_mask=head_mask,
                                                    cache_position=cache_position)
        hidden_states = _clamp_fp16(hidden_states)
        cross_weights = None
        if self.is_decoder and encoder_hidden_states is not None:
            hidden_states, cross_weights = self.layer[1](hidden_states, encoder_hidden_states, cross_bias,
                                                         cache=cross_cache, output_attentions=output_attentions,
                                                         head_mask=cross_head_mask)
            hidden_states = _clamp_fp16(hidden_states)
        hidden_states = _clamp_fp16(self.layer[-1](hidden_states))
        return hidden_states, self_weights, cross_weights


class T5Stack(nn.Module):
    main_input_name = "input_ids"  # read by GenerationMixin on the encoder

    def __init__(self, config: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embed_tokens = embed_tokens
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList(
            [T5Block(config, has_relative_attention_bias=i == 0, layer_idx=i) for i in range(config.num_layers)]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        # Set by PreTrainedModel.gradient_checkpointing_enable() (via _set_gradient_checkpointing).
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None

    def forward(self, input_ids=None, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                inputs_embeds=None, head_mask=None, cross_attn_head_mask=None, past_key_values=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None, cache=None):
        """HF's T5Stack.forward. Masks: 2D [batch, keys] or 3D [batch, queries, keys] keep-masks (1 = attend),
        or a 4D [batch, 1, queries, keys] mask used as given (bool: keep; float: additive, causality
        included), as in HF. A static cache (fixed length) takes keys at `cache_position`."""
        config = self.config
        cache = _one_cache(cache, past_key_values)
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = hf_compat.use_return_dict(config) if return_dict is None else return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        dtype, device = inputs_embeds.dtype, inputs_embeds.device

        use_cache, cache, give_back = self._own_cache(use_cache, cache)
        self_cache = cache.self_attention_cache if cache is not None else None
        past_length = self_cache.get_seq_length() if self_cache is not None else 0
        if cache_position is None:  # past_length is a tensor for some static caches: no arange(start=tensor)
            cache_position = torch.arange(length, device=device) + past_length
        if self_cache is not None and hf_compat.is_static(self_cache):
            key_length = hf_compat.static_length(self_cache)  # keys come back padded; causality hides the rest
        else:
            key_length = past_length + length

        self_bias, cross_bias = self._attention_biases(attention_mask, encoder_hidden_states, encoder_attention_mask,
                                                       batch, length, past_length, key_length, cache_position,
                                                       dtype, device)

        head_masks = _per_layer_head_mask(head_mask, len(self.block), dtype)
        cross_head_masks = _per_layer_head_mask(cross_attn_head_mask, len(self.block), dtype)
        rows = None
        if cache is not None and encoder_hidden_states is not None and \
                not all(cache.is_updated.get(i, False) for i in range(len(self.block))):
            cache.__dict__.pop(_CROSS_ROWS, None)  # this forward writes the cross cache: beam search's record is stale
            if not self.training:
                rows = _EncoderRows.of(encoder_hidden_states)
        cross_cache = (cache.cross_attention_cache, cache.is_updated, rows) if cache is not None else None
        hidden_states = self.dropout(inputs_embeds)
        all_hidden, all_self, all_cross = [], [], []
        for i, block in enumerate(self.block):
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if self.gradient_checkpointing and self.training and not hf_compat.LAYERS_CHECKPOINT_THEMSELVES:
                hidden_states, w_self, w_cross = self._gradient_checkpointing_func(
                    block.__call__, hidden_states, self_bias, encoder_hidden_states, cross_bias, None, None,
                    output_attentions, head_masks[i], cross_head_masks[i], cache_position)
            else:
                hidden_states, w_self, w_cross = block(hidden_states, self_bias, encoder_hidden_states, cross_bias,
                                                       self_cache, cross_cache, output_attentions, head_masks[i],
                                                       cross_head_masks[i], cache_position)
            if output_attentions:
                all_self.append(w_self)
                all_cross.append(w_cross)
        hidden_states = self.dropout(self.final_layer_norm(hidden_states))
        if output_hidden_states:
            all_hidden.append(hidden_states)
        output = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            **hf_compat.cache_output(give_back(cache) if use_cache and cache is not None else None),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions and self.is_decoder else None,
        )
        return output if return_dict else output.to_tuple()

    def _own_cache(self, use_cache, cache):
        """(use_cache, the EncoderDecoderCache this stack writes or None, give_back): the decoder makes
        one when asked and none was given; give_back turns it back into the caller's cache type."""
        give_back = None
        if self.is_decoder:
            use_cache = self.config.use_cache if use_cache is None else use_cache
            if self.training and self.is_checkpointing():
                use_cache = False  # as HF: recomputed blocks would write the cache twice
            if use_cache or cache is not None:
                cache, give_back = hf_compat.as_encoder_decoder_cache(cache)
                if cache is None:
                    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            if use_cache:
                raise ValueError("use_cache=True needs the decoder: the encoder keeps no cache")
            cache = None  # as HF: a cache handed to the encoder is not its own
        return use_cache, cache, give_back

    def _attention_biases(self, attention_mask, encoder_hidden_states, encoder_attention_mask, batch, length,
                          past_length, key_length, cache_position, dtype, device):
        """(self-attention bias, cross-attention bias or None): the relative position bias plus the
        additive mask (padding, causality in the decoder, a 4D mask as given), as HF's T5Stack."""
        min_value = torch.finfo(dtype).min
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.dtype == torch.bool:
                mask = torch.zeros(attention_mask.shape, dtype=dtype, device=device).masked_fill(
                    ~attention_mask.to(device), min_value)
            else:
                mask = attention_mask.to(device=device, dtype=dtype)
            if mask.shape[-2:] != (length, key_length):
                raise ValueError(f"a 4D attention mask must be [batch, 1, {length}, {key_length}] here, "
                                 f"not {list(attention_mask.shape)}")
        else:
            if attention_mask is None:
                keep = torch.ones(batch, key_length, dtype=torch.bool, device=device)
            else:
                keep = attention_mask.to(device=device, dtype=torch.bool)
                if keep.shape[-1] == length and past_length > 0:  # a mask of the new tokens only
                    keep = torch.cat([keep.new_ones(*keep.shape[:-1], past_length), keep], -1)
                if self.is_decoder and keep.shape[-1] < key_length:  # static cache: slots not written yet
                    keep = torch.cat([keep, keep.new_ones(*keep.shape[:-1], key_length - keep.shape[-1])], -1)
                if keep.shape[-1] != key_length or keep.dim() not in (2, 3):
                    raise ValueError(f"attention_mask of shape {list(attention_mask.shape)} does not fit "
                                     f"{length} tokens after {past_length} cached ones")
            keep = keep[:, None, None, :] if keep.dim() == 2 else keep[:, None]
            if self.is_decoder:
                k_pos = torch.arange(key_length, device=device)[None, :]
                keep = keep & (k_pos <= cache_position[:, None])[None, None]
            mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, min_value)

        # Block 0 owns the relative attention bias; every block uses the same position bias.
        attention = self.block[0].layer[0].SelfAttention
        self_bias = attention.compute_bias(cache_position, key_length, device).to(dtype) + mask

        cross_bias = None
        if self.is_decoder and encoder_hidden_states is not None:
            enc_len = encoder_hidden_states.shape[1]
            if encoder_attention_mask is None:
                cross_bias = torch.zeros(batch, 1, 1, enc_len, dtype=dtype, device=device)
            else:
                enc_keep = encoder_attention_mask.to(device=device, dtype=torch.bool)
                enc_keep = enc_keep[:, None, None, :] if enc_keep.dim() == 2 else enc_keep[:, None]
                cross_bias = torch.zeros(enc_keep.shape, dtype=dtype, device=device).masked_fill(~enc_keep, min_value)

        return self_bias, cross_bias

    def is_checkpointing(self) -> bool:
        """Whether gradient checkpointing is on: set on the stack (transformers 4.x) or on its blocks (5.x)."""
        return self.gradient_checkpointing or any(getattr(b, "gradient_checkpointing", False) for b in self.block)


def _one_cache(cache, past_key_values):
    """`cache` (transformers >= 5.24) and `past_key_values` (its name before) are one argument."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# Beam search's cross-attention cache (SparseT5ForConditionalGeneration._reorder_cache): which rows hold
# the same keys and values, kept on the EncoderDecoderCache as (run id per row, the tensors it holds
# for). The decoder stack drops it whenever it writes the cross cache (a new sequence, or a reset static
# cache refilled in place), so it is never read against other contents.
_CROSS_ROWS = "_sparse_t5_cross_rows"
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _cross_tensors(cache: EncoderDecoderCache) -> list:
    """The keys and values of every cross-attention layer the cache holds."""
    return [t for layer in sorted(l for l, done in cache.is_updated.items() if done)
            for t in hf_compat.cached_kv(cache.cross_attention_cache, layer)]


def _identity(tensors: list) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)


def _cross_row_runs(tensors: list):
    """Run ids of consecutive rows that are bitwise equal in every tensor (beam search repeats each input's
    encoder row over its beams, next to each other), or None where the rows cannot be compared. Bits, not
    values: -0.0 and 0.0, or two NaNs, count as different, as they would after a copy."""
    if not tensors or any(t is None or t.dim() == 0 for t in tensors):
        return None
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        return None
    if rows < 2:  # nothing to compare (and no [0, -1] reshape of an empty batch)
        return torch.zeros(rows, dtype=torch.long, device=tensors[0].device), _identity(tensors)
    same = torch.ones(rows - 1, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        row_bytes = t[:1].numel() * t.element_size()
        word = next(w for w in (8, 4, 2, 1) if row_bytes % w == 0)  # the widest word a row divides into
        bits = t.reshape(rows, -1).view(torch.uint8).view(_BITS[word])
        same &= (bits[1:] == bits[:-1]).all(dim=1)
    return torch.cat([same.new_zeros(1, dtype=torch.long), (~same).cumsum(0)]), _identity(tensors)


class _EncoderRows(NamedTuple):
    """Beam search hands the decoder each input's encoder row repeated over its beams, next to each
    other, and the first decoding step projects them into the cross-attention keys and values: at
    t5-base, batch 32, beam 10, that is 24 projections of 10240 tokens where 1024 are distinct (HF
    pays the same). With `rows`, the cross-attention projects `first` (one row per run of bitwise equal
    rows) and gives each row its run's keys and values (`run`, the run id per row). Cost: one read of
    the encoder states, once per sequence."""
    first: torch.Tensor
    run: torch.Tensor

    @staticmethod
    def of(encoder_hidden_states: torch.Tensor) -> "_EncoderRows | None":
        """The runs of encoder_hidden_states' rows, or None where every row is its own."""
        found = _cross_row_runs([encoder_hidden_states])
        if found is None:
            return None
        run = found[0]
        starts = torch.ones_like(run, dtype=torch.bool)
        starts[1:] = run[1:] != run[:-1]
        first = starts.nonzero().squeeze(1)
        return _EncoderRows(first, run) if first.numel() < run.numel() else None


def _reorder_cross_cache(cache: EncoderDecoderCache, beam_idx: torch.Tensor) -> None:
    """Reorder the cross-attention cache by beam_idx, or leave it where that would not change a bit: every
    row then takes a row of its own run."""
    tensors = _cross_tensors(cache)
    record = getattr(cache, _CROSS_ROWS, None)
    if record is None or record[1] != _identity(tensors):
        record = _cross_row_runs(tensors)
    runs = record[0] if record is not None else None
    idx = beam_idx.to(runs.device) if runs is not None else None
    comparable = runs is not None and idx.shape == runs.shape
    if comparable and torch.equal(runs.index_select(0, idx), runs):
        setattr(cache, _CROSS_ROWS, record)
        return
    cache.cross_attention_cache.reorder_cache(beam_idx)
    setattr(cache, _CROSS_ROWS, (runs.index_select(0, idx), _identity(_cross_tensors(cache))) if comparable else None)


def _per_layer_head_mask(head_mask, num_layers: int, dtype):
    """HF's head_mask ([heads], or [layers, heads]; 1 keeps a head, 0 drops it) as one [1, heads, 1, 1]
    multiplier per layer, or None per layer."""
    if head_mask is None:
        return [None] * num_layers
    if head_mask.dim() == 1:
        return [head_mask.to(dtype).view(1, -1, 1, 1)] * num_layers
    if head_mask.dim() == 2 and head_mask.shape[0] == num_layers:
        return [m.to(dtype).view(1, -1, 1, 1) for m in head_mask]
    raise ValueError(f"head_mask must be [heads] or [{num_layers}, heads], not {list(head_mask.shape)}")


class SparseT5PreTrainedModel(PreTrainedModel):
    # Any T5Config works; a compressed checkpoint loads as SparseT5Config (configuration_t5.py).
    config_class = SparseT5Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    main_input_name = "input_ids"
    _no_split_modules = ["T5Block"]
    # As HF: T5's feed-forward output projection overflows fp16, so loading in fp16 keeps `wo` in fp32
    # (T5DenseActDense casts its input to wo's dtype).
    _keep_in_fp32_modules = ["wo"]
    _supports_cache_class = True
    # Static caches (fixed-length keys written at cache_position, T5Stack.forward) and so compiled
    # decoding: 4.x reads _supports_static_cache, 5.x _can_compile_fullgraph.
    _supports_static_cache = True
    _can_compile_fullgraph = True
    # Attention always runs through F.scaled_dot_product_attention (eager math when attention weights
    # or a head mask are asked for), whatever config._attn_implementation says; the flag mirrors HF's
    # T5 so that the implementation transformers writes into the config is one HF's T5 classes accept.
    _supports_sdpa = hf_compat.HF_T5_SUPPORTS_SDPA

    def init_weights(self):
        """Called by post_init. HF's version visits modules in an order that changed between releases
        (4.x `apply`, 5.x `smart_apply`), which changes the random draws for a seed; one fixed order
        (post-order `apply`) keeps random-init training (the DSI demo) identical across versions."""
        self.apply(self._init_weights)
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self, module):
        """HF's T5 initialisation (Mesh TensorFlow's), so random-init training matches HF."""
        factor = self.config.initializer_factor
        d_model, d_kv, n_heads, d_ff = self.config.d_model, self.config.d_kv, self.config.num_heads, self.config.d_ff
        if isinstance(module, T5LayerNorm):
            module.weight.fill_(factor)
        elif isinstance(module, SparseT5ForConditionalGeneration):
            module.shared.weight.normal_(0.0, factor)
            if not module.lm_head_shared:
                module.lm_head.weight.normal_(0.0, factor)
        elif isinstance(module, T5DenseActDense):
            _init_linear(module.wi, factor * d_model ** -0.5)
            _init_linear(module.wo, factor * d_ff ** -0.5)
        elif isinstance(module, T5DenseGatedActDense):
            _init_linear(module.wi_0, factor * d_model ** -0.5)
            _init_linear(module.wi_1, factor * d_model ** -0.5)
            _init_linear(module.wo, factor * d_ff ** -0.5)
        elif isinstance(module, T5Attention):
            _init_linear(module.q, factor * (d_model * d_kv) ** -0.5)
            _init_linear(module.k, factor * d_model ** -0.5)
            _init_linear(module.v, factor * d_model ** -0.5)
            _init_linear(module.o, factor * (n_heads * d_kv) ** -0.5)
            if module.has_relative_attention_bias:
                module.relative_attention_bias.weight.normal_(0.0, factor * d_model ** -0.5)


def random_init_tensors(config: T5Config, dtype: torch.dtype = torch.float32):
    """(name, tensor) for every tensor a dense checkpoint of `config` stores, with HF's initialisation,
    one module at a time: the model is built on the meta device, and each module _init_weights sets
    (an attention, a feed-forward block, a layer norm; last the embeddings) is materialised,
    initialised, yielded and dropped. So t5-11b (11.3B parameters) needs at most one of its 1024 x 65536
    feed-forward blocks in memory. The draws follow init_weights' post-order, so under one seed the
    tensors equal what init_weights() gives the whole model (tests/test_checkpoint.py; the constructor
    itself draws torch's default inits first, so not its state)."""
    with torch.device("meta"):
        model = SparseT5ForConditionalGeneration(config)
    if model.sparse_layers():
        raise ValueError("random_init_tensors writes dense checkpoints: the config has a sparse layout")
    stored = set(checkpoint.tensors_to_save(model))
    prefix = {id(m): name for name, m in model.named_modules()}
    units = [m for m in _post_order(model)
             if isinstance(m, (T5LayerNorm, T5DenseActDense, T5DenseGatedActDense, T5Attention))]
    for unit in units + [model]:
        owned = ([model.shared] + ([] if model.lm_head_shared else [model.lm_head])) if unit is model else [unit]
        for m in owned:
            m.to_empty(device="cpu")
        model._init_weights(unit)
        for m in owned:
            for name, t in m.state_dict(prefix=prefix[id(m)] + ".").items():
                if name in stored:
                    yield name, t.to(dtype)
            m.to_empty(device="meta")


def _post_order(module):
    """Modules in nn.Module.apply's order: children first."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _init_linear(module, std):
    if isinstance(module, SparseLinear):
        module.values.normal_(0.0, std)
    elif module.weight.device.type != "meta":
        module.weight.normal_(0.0, std)


def _tied_names_are_not_missing(model, incompatible_keys):
    """A state dict stores a tied tensor once (transformers' save drops the duplicates, keeping
    shared.weight), so load_state_dict reports the other names of it (the embeddings of both stacks,
    a tied lm_head) as missing although loading its one stored name filled them: transformers'
    Trainer then warns about missing keys on every resume. Drop a missing name when another name of
    the same tensor was loaded; a tensor missing under every name stays reported."""
    missing = set(incompatible_keys.missing_keys)
    if not missing:
        return
    names_of = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(tensor), []).append(name)
    loaded_elsewhere = {name for names in names_of.values() if any(n not in missing for n in names)
                        for name in names if name in missing}
    for name in loaded_elsewhere:
        incompatible_keys.missing_keys.remove(name)


class LMHead(nn.Linear):
    """T5's lm_head: an nn.Linear (the same parameter, state dict and hooks) whose forward takes
    sparse_t5's dense few-token op at decoding steps (one token per beam) where it measured faster than
    the vendor GEMM: on CPU, with no bias and no gradient, for the token counts in `few_tokens`. The
    lm_head is not pruned, so it is the largest layer a sparse model's decode step reads. MKL's GEMM
    packs the whole fp32 weight for calls of a few tokens, a copy of 98.7 MB per call at t5-base: 6.9
    ms at 4 tokens and 14.2 ms at 10, where the op, which reads the weight once, took 3.4 and 3.9 ms
    (0.28-0.83x of F.linear at 2-16 tokens, on an Intel Xeon). At 1 token F.linear is MKL's GEMV:
    0.92x there (1.02x at t5-large's 32128 x 1024), but on an AMD EPYC MKL's GEMV read the weight
    at 7-12 GB/s (8.4-14.0 ms) where the op took 2.9-5.8 ms (0.35-0.42x), so fp32 takes the op from
    1 token. In bf16 the vendor GEMM (oneDNN, AMX on that Intel Xeon) was the faster from 8 tokens,
    so bf16 takes the op at 1-4 tokens only (0.51-0.73x). Measured by benches/lm_head_few_tokens.py;
    kernel: csrc/cpu/dense_kernels_impl.h. Everything else (training, other devices and dtypes,
    DTensor weights) is F.linear; above the op's range, fp32 inference runs F.linear over slices of
    the weight (`chunked_tokens`, below)."""

    # dtype -> the inclusive range of token counts that take the op; {} turns it off (benches compare)
    few_tokens = {torch.float32: (1, _FEW_MAX_TOKENS), torch.bfloat16: (1, 4)}
    # Above the op's range (a decoding step of a batch: 32 tokens at batch 32 greedy), fp32 F.linear
    # runs over `vocab_chunk` rows of the weight at a time: MKL packs the weight it is given, and a
    # 512-row slice (1.5 MB at d_model 768) is packed and read back from cache, where the whole
    # 98.7 MB weight went out to memory and back. On an AMD EPYC, t5-base's and t5-large's
    # 32128 x 768/1024: 0.63-0.72x of one F.linear at 32-64 tokens, 0.70-0.84x at 128-256, then the
    # gain fades (0.89-0.98x at 320, 0.94-1.09x at 512-1024), hence the top of 256
    # (benches/lm_head_few_tokens.py). Same inference-only conditions as the op; {} turns it off.
    chunked_tokens = {torch.float32: (_FEW_MAX_TOKENS + 1, 256)}
    vocab_chunk = 512

    def forward(self, x):
        w = self.weight
        if (self.bias is None and x.device.type == "cpu" and x.dtype == w.dtype and type(w) is nn.Parameter
                and x.shape[-1] and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            tokens = x.numel() // x.shape[-1]
            lo, hi = self.few_tokens.get(w.dtype, (0, -1))
            if lo <= tokens <= hi:
                return dense_linear_few_tokens(x, w)
            lo, hi = self.chunked_tokens.get(w.dtype, (0, -1))
            if lo <= tokens <= hi and w.shape[0] > self.vocab_chunk:
                return linear_over_row_slices(x, w, self.vocab_chunk)
        return F.linear(x, w, self.bias)


def linear_over_row_slices(x: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """F.linear(x, w) as F.linear over `rows` rows of w at a time, concatenated (LMHead.chunked_tokens)."""
    return torch.cat([F.linear(x, w[i:i + rows]) for i in range(0, w.shape[0], rows)], dim=-1)


class SparseT5ForConditionalGeneration(hf_compat.EncoderMaskInGeneration, SparseT5PreTrainedModel, GenerationMixin):
    """T5 encoder-decoder LM whose attention / feed-forward Linears can be sparse.

    Same constructor, forward, generate and checkpoint interface as HF's
    T5ForConditionalGeneration; plus `sparsify`, `densify`, `to_hf` and `sparsity_report`.
    """
    # HF's declaration (a list in 4.x, a {tied: source} map in 5.x), for transformers' utilities that read
    # it; tying itself is tie_weights below, which keeps lm_head separate for untied (v1.1) checkpoints.
    _tied_weights_keys = hf_compat.HF_T5_TIED_WEIGHTS_KEYS

    def __init__(self, config: T5Config):
        super().__init__(config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        encoder_config = copy.deepcopy(config)
        encoder_config.is_decoder = False
        encoder_config.use_cache = False
        encoder_config.is_encoder_decoder = False
        self.encoder = T5Stack(encoder_config, self.shared)
        decoder_config = copy.deepcopy(config)
        decoder_config.is_decoder = True
        decoder_config.is_encoder_decoder = False
        decoder_config.num_layers = config.num_decoder_layers
        self.decoder = T5Stack(decoder_config, self.shared)
        self.lm_head = LMHead(config.d_model, config.vocab_size, bias=False)
        # Whether lm_head shares the embedding matrix: T5 v1's config says so; an untied config
        # can still share it when its checkpoint has no lm_head.weight (from_pretrained).
        self.lm_head_shared = lm_head_is_tied(config)
        if getattr(config, "tie_encoder_decoder", False):
            # Tying the encoder's and decoder's weights by module name (HF's option, unused by t5, t5 v1.1
            # and flan-t5) would make one sparse layer serve two prunings: sparsify selects and masks each
            # layer on its own. Refused rather than ignored.
            raise ValueError("config.tie_encoder_decoder=True is not supported by SparseT5ForConditionalGeneration")
        # A checkpoint's sparse layout (from `save_pretrained`) is rebuilt by from_pretrained.
        if getattr(config, LAYOUT_KEY, None):
            sparsify.apply_layout(self, getattr(config, LAYOUT_KEY))
        # HF's: initialise (_init_weights), tie (tie_weights), and the legacy config.gradient_checkpointing.
        self.post_init()
        self.register_load_state_dict_post_hook(_tied_names_are_not_missing)

    # ---- HF plumbing ------------------------------------------------------------------------
    def _tie_lm_head(self):
        if self.lm_head_shared:
            self.lm_head.weight = self.shared.weight

    def tie_weights(self, *args, **kwargs):
        self.encoder.embed_tokens = self.shared
        self.decoder.embed_tokens = self.shared
        self._tie_lm_head()

    def get_input_embeddings(self):
        return self.shared

    def set_input_embeddings(self, new_embeddings):
        self.shared = new_embeddings
        self.encoder.embed_tokens = new_embeddings
        self.decoder.embed_tokens = new_embeddings
        self._tie_lm_head()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings
        self.lm_head_shared = new_embeddings.weight is self.shared.weight

    def get_encoder(self, *args, **kwargs):
        return self.encoder

    def get_decoder(self):
        return self.decoder

    def _shift_right(self, input_ids):
        # getattr: transformers 5.x configs may lack the attribute instead of holding None
        start, pad = getattr(self.config, "decoder_start_token_id", None), getattr(self.config, "pad_token_id", None)
        if start is None or pad is None:
            raise ValueError("config.decoder_start_token_id and config.pad_token_id must be set (T5 uses the pad id)")
        shifted = input_ids.new_zeros(input_ids.shape)
        shifted[..., 1:] = input_ids[..., :-1].clone()
        shifted[..., 0] = start
        return shifted.masked_fill_(shifted == -100, pad)

    def _prepare_cache_for_generation(self, *args, **kwargs):
        # transformers sizes generate's cache by config.get_text_config(decoder=True), which for T5 is the
        # encoder's depth (num_layers): a decoder deeper than the encoder then indexes past the cache
        # (IndexError; HF's own T5 does the same) and a shallower one gets unused layers. Build it with
        # the decoder's depth, whatever kind of cache generate asks for.
        # The sparsity layout is set aside meanwhile: get_text_config deep-copies the config and walks
        # its to_dict, and a t5-base layout's ~170 nested dicts made that 4-6 ms of every generate call
        # (benches/serving.py's t5-base, csr:0.9, batch 1 greedy: 129 against 123 ms; HF dense 286 ms).
        config = self.config
        encoder_depth = config.num_layers
        layout = config.__dict__.pop(LAYOUT_KEY, None)
        config.num_layers = config.num_decoder_layers
        try:
            return super()._prepare_cache_for_generation(*args, **kwargs)
        finally:
            config.num_layers = encoder_depth
            if layout is not None:
                config.__dict__[LAYOUT_KEY] = layout

    def _reorder_cache(self, past_key_values, beam_idx):
        """Beam search's reorder of the cache after each step (generate calls it from transformers 4.54
        on; 4.49-4.53 call the cache's own reorder_cache, which copies both parts, as HF's T5 does).

        The self-attention cache is reordered. The cross-attention cache is copied only where that
        changes it: beam search gives every beam of an input the same encoder row, so its cross keys
        and values are the same in every beam, and a reorder among one input's beams leaves them as
        they are. HF copies them anyway, every step: at t5-base, batch 32, beam 10, source 32, that
        is 24 tensors of 31 MB a step, 70-120 ms (README "Beam search and the lm_head at decoding steps").
        Which rows are equal is checked, bitwise, on the cache itself (_reorder_cross_cache), so the
        skip is exact whatever generate or the caller hands in."""
        if past_key_values is None:
            return None
        if isinstance(past_key_values, (tuple, list)):  # the legacy format (transformers 4.x)
            return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)
        if not isinstance(past_key_values, EncoderDecoderCache):
            past_key_values.reorder_cache(beam_idx)
            return past_key_values
        past_key_values.self_attention_cache.reorder_cache(beam_idx)
        _reorder_cross_cache(past_key_values, beam_idx)
        return past_key_values

    def prepare_decoder_input_ids_from_labels(self, labels):
        return self._shift_right(labels)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                head_mask=None, decoder_head_mask=None, cross_attn_head_mask=None, encoder_outputs=None,
                past_key_values=None, inputs_embeds=None, decoder_inputs_embeds=None, labels=None, use_cache=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, cache_position=None, cache=None):
        """HF's T5ForConditionalGeneration.forward, keyword for keyword, for every transformers in the
        tested range (sparse_t5.hf_compat.TESTED_TRANSFORMERS).

        `cache` (transformers 5.24's name) and `past_key_values` (the name before it) are the same
        argument, and the output carries the cache under the name the installed transformers' generate
        reads. There is no **kwargs: an unknown keyword raises TypeError naming it, as HF's 4.x forward
        does, rather than being dropped (a dropped `cache=` once made every cached decoding step run
        without its past). None means the config's value for use_cache, output_attentions,
        output_hidden_states and return_dict, as in HF; so with labels the cache is built too (pass
        use_cache=False when training)."""
        config = self.config
        cache = _one_cache(cache, past_key_values)
        use_cache = config.use_cache if use_cache is None else use_cache
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = hf_compat.use_return_dict(config) if return_dict is None else return_dict
        if encoder_outputs is None:
            encoder_outputs = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                           inputs_embeds=inputs_embeds, head_mask=head_mask,
                                           output_attentions=output_attentions,
                                           output_hidden_states=output_hidden_states, return_dict=True)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(
                last_hidden_state=encoder_outputs[0],
                hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
                attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
            )
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask, inputs_embeds=decoder_inputs_embeds,
            cache=cache, encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask, head_mask=decoder_head_mask,
            cross_attn_head_mask=cross_attn_head_mask, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, cache_position=cache_position, return_dict=True,
        )
        sequence_output = decoder_outputs.last_hidden_state
        if lm_head_is_tied(self.config):
            sequence_output = sequence_output * (self.model_dim ** -0.5)
        logits = self.lm_head(sequence_output)
        loss = None
        if labels is not None:
            # In fp32 whatever the weights' dtype: a bf16 log-softmax over 32k logits loses the loss's
            # low bits, and training in bf16 (weights and gradients) needs them (HF's T5 keeps its
            # attention softmax in fp32 for the same reason; ours does too).
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.to(logits.device).reshape(-1),
                                   ignore_index=-100)
        output = Seq2SeqLMOutput(
            loss=loss, logits=logits, **hf_compat.cache_output(getattr(decoder_outputs, hf_compat.CACHE_NAME)),
            decoder_hidden_states=decoder_outputs.hidden_states, decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states, encoder_attentions=encoder_outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    # ---- sparsity ----------------------------------------------------------------------------
    def sparse_layers(self) -> dict[str, SparseLinear]:
        return {n: m for n, m in self.named_modules() if isinstance(m, SparseLinear)}

    @torch.no_grad()
    def sparsify(self, sparsity: float | None = None, format: str = "csr", method: str = "magnitude",
                 scope: str = "layer", include=None, exclude=None,
                 optimizer: torch.optim.Optimizer | None = None) -> dict:
        """Prune the targeted Linears and store them compressed. Returns {layer name: sparsity}.

        format="csr": unstructured, to `sparsity` (fraction of zeros against the dense size);
        scope "layer" (each layer to `sparsity`) or "global" (one magnitude threshold over all
        targets). Already sparse CSR targets shrink in place (never densify).
        format="2:4": the 2 largest |w| of every 4 inputs (sparsity is 0.5 by construction).
        Dense targets become sparse layers and their dense weight is freed. include / exclude:
        regexes over module names (default targets: attention q k v o and feed-forward
        wi wi_0 wi_1 wo; embeddings and lm_head stay dense). With `optimizer`, its state is
        remapped to the surviving weights.
        """
        return sparsify.sparsify(self, sparsity, format, method, scope, include, exclude, optimizer)

    @torch.no_grad()
    def densify(self) -> "SparseT5ForConditionalGeneration":
        """Replace every SparseLinear by an nn.Linear holding the same (zero-filled) weight."""
        for name, module in list(self.sparse_layers().items()):
            self._replace_module(name, module.to_linear())
        self.config.__dict__.pop(LAYOUT_KEY, None)
        return self

    def to_hf(self):
        """A plain transformers.T5ForConditionalGeneration with the same weights (dense), for export."""
        return checkpoint.to_hf(self)

    def sparsity_report(self) -> dict:
        """nnz, dense size and bytes of the sparse layers and of everything else."""
        sparse = self.sparse_layers()
        sparse_bytes = sum(m.memory_bytes() for m in sparse.values())
        sparse_ids = {id(t) for m in sparse.values() for t in list(m.parameters()) + list(m.buffers())}
        other = {id(t): t for t in list(self.parameters()) + list(self.buffers()) if id(t) not in sparse_ids}
        return {
            "sparse_layers": len(sparse),
            "nnz": sum(m.nnz for m in sparse.values()),
            "dense_size": sum(m.in_features * m.out_features for m in sparse.values()),
            "sparse_bytes": sparse_bytes,
            "other_bytes": sum(t.numel() * t.element_size() for t in other.values()),
        }

    def _replace_module(self, name: str, module: nn.Module):
        sparsify.replace_module(self, name, module)

    # ---- checkpoints (sparse_t5/checkpoint.py) ---------------------------------------------------------
    def save_pretrained(self, save_directory, safe_serialization: bool = True, state_dict=None, **kwargs):
        """Write config.json (with the sparsity layout), generation_config.json and
        model.safetensors (compressed tensors for sparse layers, plus a content hash). Each file is
        written to a temporary name and renamed, so a crash never leaves a half-written file.
        `state_dict`, as in transformers: the tensors to write instead of this model's (a sharded
        model's, gathered with sparse_t5.distributed.full_state_dict)."""
        if not safe_serialization:
            raise ValueError("sparse_t5 writes safetensors only")
        checkpoint.save_pretrained(self, save_directory, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, dtype=None,
                        torch_dtype=None, device=None, device_map=None, map_location=None, sparsity=None,
                        format=None, scope="layer", include=None, exclude=None, cache_dir=None, revision=None,
                        local_files_only=False, token=None, subfolder="", force_download=False, proxies=None,
                        output_loading_info=False, state_dict=None, **kwargs):
        """Load any HF T5 checkpoint (hub name or local directory; safetensors or pytorch_model.bin,
        sharded or not), or a sparse checkpoint written by `save_pretrained`.

        The checkpoint is streamed, tensor by tensor, into a model built on the meta device; sparse
        layers are created at their stored nnz. Missing or unexpected keys, a truncated or corrupt
        file, a pickle payload, or a layout that does not match the tensors raise ValueError.

        Prune-at-load: `sparsity=`, `format=` ("csr" | "2:4"), `scope=` ("layer" | "global"),
        `include=` / `exclude=` take `sparsify`'s arguments; each targeted weight is pruned and
        compressed as it is read, so the dense model is never held (on the host or the device). The
        result equals loading dense and calling `sparsify` with the same arguments.

        Placement as in transformers: CPU by default; `device_map` ("auto", "cuda:0", {"": "cuda:0"}),
        `map_location` or `device` put the whole model on one device (sparse_t5.devices.placement).

        As transformers: `state_dict=` loads those tensors instead of the checkpoint's files (the path
        may then be None, with `config=`); `output_loading_info=True` also returns
        {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}, which are always empty,
        since loading is strict: a checkpoint missing a weight raises instead of leaving it random.
        With `dtype=torch.float16`, the `_keep_in_fp32_modules` (`wo`) stay fp32, as in HF.
        Other keywords update the config, as in transformers.
        """
        from transformers import AutoConfig, T5Config

        hf_compat.drop_auto_loader_keywords(kwargs)
        if torch.get_default_device().type == "meta":  # transformers' own check and message
            raise RuntimeError("You are using `from_pretrained` with a meta device context manager or "
                               "`torch.set_default_device('meta')`: the weights would never be loaded. Load "
                               "without it; from_pretrained builds on the meta device itself and never "
                               "materialises a dense weight for a sparse layer.")
        target = placement(device, device_map, map_location)
        dtype = dtype or torch_dtype
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        hub = dict(cache_dir=cache_dir, revision=revision, local_files_only=local_files_only, token=token,
                   subfolder=subfolder, force_download=force_download, proxies=proxies)
        if config is None:
            if pretrained_model_name_or_path is None:
                raise ValueError("from_pretrained(None, ...) needs config= (and state_dict=)")
            # AutoConfig: T5Config for a "t5" checkpoint, SparseT5Config for a compressed one.
            config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub, **kwargs)
            if not isinstance(config, T5Config):
                raise ValueError(f"{pretrained_model_name_or_path} is not a T5 checkpoint: its model_type is "
                                 f"{config.model_type!r}")
        else:
            unknown = sorted(k for k in kwargs if not hasattr(config, k))
            if unknown:
                raise TypeError(f"from_pretrained() got unexpected keyword arguments {unknown}")
            config = copy.deepcopy(config)  # as transformers: the caller's config is not modified (the layout key)
            for key, value in kwargs.items():
                setattr(config, key, value)
        model = checkpoint.load_pretrained(cls, pretrained_model_name_or_path, config, hub, target, dtype, sparsity,
                                           format, scope, include, exclude, state_dict=state_dict)
        if output_loading_info:
            return model, hf_compat.empty_loading_info()
        return model


register_auto_classes()  # AutoModelForSeq2SeqLM loads compressed checkpoints as this class
