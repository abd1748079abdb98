"""Cached generation equals uncached generation: an invariant that needs no reference model.

A cache that is dropped, misnamed or misread (transformers 5.24 renamed `past_key_values` to `cache`,
and a forward that swallowed unknown keywords lost it) changes what a decoder sees and so, sooner or
later, the ids it picks. At every step of a cached `generate`, each row's next-token scores must equal
a forward of that row's whole prefix with use_cache=False, whatever transformers version drives it;
without beams the cached and uncached runs must also give the same ids. Covered: greedy, 4-beam,
seeded sampling, greedy and 4-beam with a static (fixed-length) cache, and the DSI path (beam search
constrained to a trie of multi-token docids, by logits processor and by prefix function), on every
test config including asymmetric depths, dense, CSR-sparse and 2:4, with a padded row (which caught
transformers 4.49.0 dropping the encoder mask in generate).

Also here: the forward's keyword contract (unknown keywords raise, `cache` and `past_key_values` are
one argument, config-level defaults, the cache returned with labels).
"""
import pytest
import torch
import transformers
from transformers import LogitsProcessorList, T5Config

from sparse_t5 import SparseT5ForConditionalGeneration, hf_compat
from sparse_t5.dsi.decoding import DocidTrie, TrieLogitsProcessor
from sparse_t5.dsi.docids import DocidMapping
from test_modeling_t5 import CONFIGS as HF_PARITY_CONFIGS

VOCAB = 64
CONFIGS = {
    **HF_PARITY_CONFIGS,  # v1 ReLU tied, v1.1 gated untied, heads x d_kv != d_model
    "deeper_decoder": dict(d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=1, num_decoder_layers=3,
                           feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "deeper_encoder": dict(d_model=32, d_kv=8, num_heads=4, d_ff=72, num_layers=3, num_decoder_layers=1,
                           feed_forward_proj="relu"),
}
SPARSITY = {"dense": None, "csr_0.6": dict(sparsity=0.6), "2:4": dict(format="2:4")}


def make_model(name, sparse, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    # initializer_factor 4: random init at HF's scale gives near-uniform logits and one id repeated;
    # larger weights make the next id depend on the prefix, which is what a lost cache would change.
    config = T5Config(vocab_size=VOCAB, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      initializer_factor=4.0, **CONFIGS[name])
    model = SparseT5ForConditionalGeneration(config).eval()
    if SPARSITY[sparse]:
        model.sparsify(**SPARSITY[sparse])
    return model.to(dtype)


def inputs(seed=1, b=3, src=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (b, src), generator=g)
    mask = torch.ones(b, src, dtype=torch.long)
    mask[-1, 6:] = 0  # padding in the last row
    return ids, mask


def docid_trie():
    """40 docids of 2-4 tokens sharing prefixes (as semantic docids do), each ending in EOS (1)."""
    g = torch.Generator().manual_seed(7)
    seqs = {}
    while len(seqs) < 40:
        length = int(torch.randint(2, 5, (1,), generator=g))
        seq = [int(t) for t in torch.randint(2, 12, (length - 1,), generator=g)] + [1]
        seqs.setdefault(tuple(seq), f"d{len(seqs)}")
    mapping = DocidMapping("semantic", {d: list(s) for s, d in seqs.items()})
    return DocidTrie(mapping, VOCAB, pad_token_id=0)


TRIE = docid_trie()
MODES = {
    "greedy": dict(max_new_tokens=8, suppress_tokens=[0, 1]),
    "beam4": dict(max_new_tokens=8, num_beams=4, suppress_tokens=[0, 1]),
    "sample": dict(max_new_tokens=8, do_sample=True, top_k=20, suppress_tokens=[0, 1]),
    # a fixed-length cache, keys written at cache_position (what compiled decoding uses)
    "greedy_static_cache": dict(max_new_tokens=8, suppress_tokens=[0, 1], cache_implementation="static"),
    "beam4_static_cache": dict(max_new_tokens=8, num_beams=4, suppress_tokens=[0, 1], cache_implementation="static"),
    # the DSI path (sparse_t5.dsi.decoding.retrieve): constrained beams, every beam returned
    "trie_processor_beam": dict(max_length=5, num_beams=4, num_return_sequences=4, early_stopping=True,
                                logits_processor=LogitsProcessorList([TrieLogitsProcessor(TRIE)])),
    "trie_prefix_fn_beam": dict(max_length=5, num_beams=4, num_return_sequences=4, early_stopping=True,
                                prefix_allowed_tokens_fn=TRIE.prefix_allowed_tokens_fn()),
}


# |cached - full recompute| <= TOL x max|full recompute|, in float64. The cached and uncached decoders
# sum in different orders (cached keys vs one whole prefix; one token per call vs whole sequences, which
# the kernel policy may send to different methods). Large random weights (initializer_factor 4) make
# this model ill-conditioned: in fp32, step 1 of trie_processor_beam / v1_relu_tied / CSR 0.6 differs
# from a float64 run of the same model by 3e-4 (dense method) to 1.3e-3 (CSR method) of the scale,
# though every method's single layer is within 1e-7 of float64 (measured on an Intel Xeon, AVX-512).
# So in fp32 cached vs uncached agree to 1e-3 only when both paths round alike: a tuned method table
# that picks one method at 1 token and another at 24 gave 1.5e-3. In float64 every policy and table
# gives at most 2.5e-7 (median 8e-8, the 105 cases; the floor is the attention softmax and norm
# variance, which run in fp32 as in HF), while a lost past moves the scores by 0.06-1 of the scale
# (median 0.9), and 4.49's dropped encoder mask by 0.7.
TOL = 1e-5


def assert_close_to_scale(a, b, tol=TOL, what=""):
    """|a - b| <= tol x max|b| (TOL above)."""
    scale = b.abs().max().item()
    err = (a - b).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol} x {scale:.3e}"


class RecordScores:
    """A logits processor that keeps what the decoder computed at each step: the rows' prefixes (every
    beam's, under beam search) and their next-token scores, as the processors before it left them
    (masked to -inf where suppressed or off the trie; log-softmaxed under beam search)."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.clone(), scores.clone()))
        return scores


def generate(model, use_cache, mode):
    ids, mask = inputs()
    torch.manual_seed(123)  # the sampling mode draws the same numbers in both runs
    kwargs = dict(MODES[mode])
    if not use_cache:
        kwargs.pop("cache_implementation", None)
    record = RecordScores()
    kwargs["logits_processor"] = LogitsProcessorList([record, *kwargs.get("logits_processor", [])])
    out = model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    return out, record.steps


def centred(scores, allowed):
    """Scores relative to each row's best allowed token: logits and their log-softmax agree on this."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores - scores.max(dim=-1, keepdim=True).values)[allowed]


@pytest.mark.parametrize("sparse", list(SPARSITY))
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", list(MODES))
def test_cached_generation_equals_uncached(config, sparse, mode):
    model = make_model(config, sparse, dtype=torch.float64)  # float64: see TOL
    (cached, steps), (uncached, _) = generate(model, True, mode), generate(model, False, mode)
    seqs = cached.sequences
    if mode.startswith("trie"):  # every returned hypothesis is a whole docid from the trie (or padding)
        for row in seqs[:, 1:].tolist():
            toks = row[: row.index(1) + 1] if 1 in row else row
            assert TRIE.mapping.docid_of(toks) is not None or set(toks) <= {0}, row
        assert len({tuple(r) for r in seqs.tolist()}) >= 4, seqs  # distinct hypotheses: the search explored
    # Not vacuous: the last step's scores differ between rows (inputs, or beams' prefixes).
    last = torch.nan_to_num(cached.scores[-1], neginf=0.0)
    assert (last - last[:1]).abs().max() > 1e-3 * last.abs().max(), "the scores do not depend on the input"

    # Every step, every row (each beam): what the cached decoder computed for its prefix equals a full
    # recompute of that prefix without a cache. This holds whatever the search does with ties: beam
    # search keeps the top beams by score, and hypotheses whose scores tie to fp32 noise (measured under
    # transformers 4.49: -3.43655 vs -3.43657 in the deeper_decoder case, one off-path token at two
    # different places in a repeated-token run) may be kept by one run and dropped by the other, so
    # comparing two whole searches step by step is not an invariant; this is. A cache that is lost,
    # misread or not reordered with its beams gives another prefix's scores: O(1) of the scale.
    ids, mask = inputs()
    for step, (prefix, scores) in enumerate(steps):
        per_input = len(prefix) // len(ids)
        full = model(input_ids=ids.repeat_interleave(per_input, 0), attention_mask=mask.repeat_interleave(per_input, 0),
                     decoder_input_ids=prefix, use_cache=False).logits[:, -1]
        allowed = torch.isfinite(scores)
        assert allowed.any(dim=-1).all(), f"step {step}: a row with no token allowed"
        assert_close_to_scale(centred(scores, allowed), centred(full, allowed), what=f"step {step} scores")
    # Without beams there are no ties to break differently: the whole runs agree, ids and scores.
    if "num_beams" not in MODES[mode]:
        assert torch.equal(seqs, uncached.sequences), f"cached {seqs.tolist()} != uncached {uncached.sequences.tolist()}"
        for step, (a, b) in enumerate(zip(cached.scores, uncached.scores)):
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"step {step}: different tokens allowed"
            assert_close_to_scale(a[finite], b[finite], what=f"step {step} scores")


def test_the_cache_is_used_not_just_accepted():
    """A decoder fed only its last token gives the full-prefix logits only through the cache: under
    both names of the keyword."""
    model = make_model("v11_gated_untied", "csr_0.6")
    ids, mask = inputs()
    dec = torch.randint(2, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    dec[:, 0] = 0
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[:, -1]
    for name in ("cache", "past_key_values"):
        prefix = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :-1], use_cache=True)
        cache = getattr(prefix, hf_compat.CACHE_NAME)
        assert cache is not None and cache.get_seq_length() == 4
        step = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, -1:], use_cache=True,
                     **{name: cache}).logits[:, -1]
        assert_close_to_scale(step, full, 1e-5, what=name)
    cut = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, -1:], use_cache=False).logits[:, -1]
    assert (cut - full).abs().max() > 0.01 * full.abs().max()  # without its past the step differs: the check bites


def test_generate_builds_its_cache_without_the_layout_and_restores_the_config(monkeypatch):
    """transformers builds generate's cache from a deep copy of the config; ours hands it the config
    without the sparsity layout (copying a t5-base layout's ~170 nested dicts cost 4-6 ms a generate
    call) and with the decoder's depth, and generate leaves the config as it found it: the same layout
    object and the encoder's depth, also when building the cache fails."""
    from transformers.generation.utils import GenerationMixin

    model = make_model("deeper_decoder", "csr_0.6")
    layout, depth = model.config.sparse_t5, model.config.num_layers
    assert layout["layers"] and depth != model.config.num_decoder_layers
    seen = []
    original = GenerationMixin._prepare_cache_for_generation

    def spy(self, *args, **kwargs):
        seen.append((getattr(self.config, "sparse_t5", None), self.config.num_layers))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "_prepare_cache_for_generation", spy)
    ids, mask = inputs()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert seen == [(None, model.config.num_decoder_layers)]
    assert model.config.sparse_t5 is layout and model.config.num_layers == depth

    def fail(self, *args, **kwargs):
        raise RuntimeError("cache construction failed")

    monkeypatch.setattr(GenerationMixin, "_prepare_cache_for_generation", fail)
    with pytest.raises(RuntimeError, match="cache construction failed"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
    assert model.config.sparse_t5 is layout and model.config.num_layers == depth


def cached_after_one_step(model, encoder_rows, beams=2):
    """The EncoderDecoderCache of one cached decoder step over encoder_rows' inputs, each repeated over
    `beams` consecutive rows, as beam search expands them."""
    ids = torch.randint(2, VOCAB, (encoder_rows, 9), generator=torch.Generator().manual_seed(5))
    out = model(input_ids=ids.repeat_interleave(beams, 0), decoder_input_ids=torch.zeros(encoder_rows * beams, 1, dtype=torch.long),
                use_cache=True)
    return getattr(out, hf_compat.CACHE_NAME)


def cross_kv(cache):
    return [t for layer in range(len(cache.is_updated)) for t in hf_compat.cached_kv(cache.cross_attention_cache, layer)]


def test_beam_reorder_copies_the_cross_cache_only_where_a_row_changes():
    """Beam search reorders the cache every step. The cross-attention keys and values of one input's
    beams are the same, so a reorder among them leaves that cache as it is and ours does not copy it
    (24 tensors of 31 MB a step at t5-base, batch 32, beam 10); the self-attention cache is reordered
    as HF does. Where a row would change (another input's row, or bits that differ, -0.0 against 0.0)
    the cross cache is copied exactly as index_select would."""
    model = make_model("v11_gated_untied", "csr_0.6")
    with torch.no_grad():
        cache = cached_after_one_step(model, encoder_rows=3)  # rows 0-1, 2-3, 4-5 share an input
        cross = cross_kv(cache)
        assert len(cross) == 2 * model.config.num_decoder_layers
        self_before = [t.clone() for layer in range(len(cache.is_updated))
                       for t in hf_compat.cached_kv(cache.self_attention_cache, layer)]
        within = torch.tensor([1, 0, 2, 2, 5, 4])
        assert model._reorder_cache(cache, within) is cache
        assert all(a is b for a, b in zip(cross_kv(cache), cross)), "a reorder among beams copied the cross cache"
        self_after = [t for layer in range(len(cache.is_updated)) for t in hf_compat.cached_kv(cache.self_attention_cache, layer)]
        for a, b in zip(self_after, self_before):
            assert torch.equal(a, b.index_select(0, within))

        across = torch.tensor([2, 3, 0, 1, 4, 4])  # rows 0-3 take another input's row
        before = [t.clone() for t in cross]
        model._reorder_cache(cache, across)
        for a, b in zip(cross_kv(cache), before):
            assert torch.equal(a, b.index_select(0, across))
        model._reorder_cache(cache, torch.tensor([1, 0, 3, 2, 5, 4]))  # the runs moved with the rows
        for a, b in zip(cross_kv(cache), before):
            assert torch.equal(a, b.index_select(0, across))
        swapped = torch.tensor([4, 4, 2, 3, 0, 1])
        model._reorder_cache(cache, swapped)  # now rows 0-1 hold input 2's row and 4-5 input 0's
        for a, b in zip(cross_kv(cache), before):
            assert torch.equal(a, b.index_select(0, across).index_select(0, swapped))

        # Equal values, other bits: 0.0 and -0.0 in two beams of one input are not the same row.
        cache = cached_after_one_step(model, encoder_rows=1)
        key = hf_compat.cached_kv(cache.cross_attention_cache, 0)[0]
        key[0].view(-1)[0], key[1].view(-1)[0] = 0.0, -0.0
        model._reorder_cache(cache, torch.tensor([1, 0]))
        moved = hf_compat.cached_kv(cache.cross_attention_cache, 0)[0]
        assert torch.signbit(moved[0].view(-1)[0]) and not torch.signbit(moved[1].view(-1)[0])

        # One row, and no cache at all: nothing to compare, nothing to reorder.
        cache = cached_after_one_step(model, encoder_rows=1, beams=1)
        cross = cross_kv(cache)
        model._reorder_cache(cache, torch.tensor([0]))
        assert all(a is b for a, b in zip(cross_kv(cache), cross))
        assert model._reorder_cache(None, torch.tensor([0])) is None


def test_the_cross_row_record_is_dropped_when_the_decoder_rewrites_the_cross_cache():
    """What _reorder_cache knows of the cross rows holds only for the tensors it was computed on: a
    forward that writes the cross cache again (a new sequence, or a static cache reset and refilled in
    place, at the same address) drops it."""
    from sparse_t5.modeling_t5 import _CROSS_ROWS
    from transformers.cache_utils import DynamicCache

    model = make_model("v11_gated_untied", "csr_0.6")
    with torch.no_grad():
        cache = cached_after_one_step(model, encoder_rows=2)
        model._reorder_cache(cache, torch.tensor([1, 0, 3, 2]))
        assert getattr(cache, _CROSS_ROWS, None) is not None
        model(input_ids=torch.randint(2, VOCAB, (4, 9)), decoder_input_ids=torch.zeros(4, 1, dtype=torch.long),
              use_cache=True, **{hf_compat.CACHE_NAME: cache})  # cross cache filled: nothing written
        assert getattr(cache, _CROSS_ROWS, None) is not None
        cache.cross_attention_cache = DynamicCache()
        for layer in cache.is_updated:
            cache.is_updated[layer] = False
        model(input_ids=torch.randint(2, VOCAB, (4, 9)), decoder_input_ids=torch.zeros(4, 1, dtype=torch.long),
              use_cache=True, **{hf_compat.CACHE_NAME: cache})
        assert getattr(cache, _CROSS_ROWS, None) is None


def test_beam_search_runs_the_same_without_copying_the_cross_cache(monkeypatch):
    """Through generate: the beams, their scores and every step's scores are bitwise those of the run
    that copies the cross cache at every step as HF does, and (from transformers 4.54, whose generate
    calls the model's _reorder_cache) the cross cache is never copied. 4.49-4.53's generate calls the
    cache's own reorder_cache: both parts are copied, as HF's T5 does."""
    from packaging.version import Version
    import sparse_t5.modeling_t5 as modeling

    model = make_model("v11_gated_untied", "csr_0.6")
    ids, mask = inputs()
    kw = dict(max_new_tokens=6, num_beams=4, suppress_tokens=[0, 1], output_scores=True, return_dict_in_generate=True)
    copies = []  # cross-cache copies of the HF-style run
    original = modeling._reorder_cross_cache
    with torch.no_grad():
        monkeypatch.setattr(modeling, "_reorder_cross_cache",
                            lambda cache, idx: (copies.append(1), cache.cross_attention_cache.reorder_cache(idx)))
        copied = model.generate(input_ids=ids, attention_mask=mask, **kw)
        monkeypatch.setattr(modeling, "_reorder_cross_cache", original)
        cross_copies = []  # every DynamicCache reorder of our run: the self-attention cache's, and any cross copy
        from transformers.cache_utils import DynamicCache
        plain = DynamicCache.reorder_cache

        def count(self, idx):
            cross_copies.append(self)
            return plain(self, idx)

        monkeypatch.setattr(DynamicCache, "reorder_cache", count)
        ours = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(ours.sequences, copied.sequences)
    assert torch.equal(ours.sequences_scores, copied.sequences_scores)
    assert all(torch.equal(a, b) for a, b in zip(ours.scores, copied.scores))
    steps = len(ours.scores)  # one reorder after every step
    if Version(transformers.__version__) >= Version("4.54"):
        assert len(copies) == steps and len(cross_copies) == steps, (len(copies), len(cross_copies))  # self-attention only
    else:
        assert len(copies) == 0 and len(cross_copies) == 2 * steps, (len(copies), len(cross_copies))


def test_the_cross_projection_runs_once_per_distinct_encoder_row(monkeypatch):
    """Beam search repeats each input's encoder row over its beams; the first decoding step projects the
    cross-attention keys and values of each distinct row once (10x fewer tokens at beam 10) and hands
    every beam its row's. The cache holds what projecting every row gives (to the kernels' tolerance:
    fewer tokens may take another method), one contiguous row per beam; a batch without repeats, and
    training, project every row; and beam search picks the same beams with and without."""
    import sparse_t5.modeling_t5 as modeling

    model = make_model("v11_gated_untied", "csr_0.6")
    projected = []  # token rows of every cross-attention key projection
    for block in model.decoder.block:
        block.layer[1].EncDecAttention.k.register_forward_hook(lambda mod, inp, out: projected.append(inp[0].shape[0]))
    layers = model.config.num_decoder_layers
    with torch.no_grad():
        cache = cached_after_one_step(model, encoder_rows=3, beams=4)
        assert projected == [3] * layers
        kv = cross_kv(cache)
        assert all(t.shape[0] == 12 and t.is_contiguous() for t in kv)
        monkeypatch.setattr(modeling._EncoderRows, "of", staticmethod(lambda states: None))
        projected.clear()
        every_row = cross_kv(cached_after_one_step(model, encoder_rows=3, beams=4))
        assert projected == [12] * layers
        for a, b in zip(kv, every_row):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            assert torch.equal(a[0::4], a[3::4]) and not torch.equal(a[0], a[4])
        monkeypatch.undo()

        projected.clear()
        cached_after_one_step(model, encoder_rows=6, beams=1)  # no repeats: every row
        assert projected == [6] * layers
        ids, mask = inputs()
        kw = dict(max_new_tokens=5, num_beams=4, suppress_tokens=[0, 1], output_scores=True, return_dict_in_generate=True)
        projected.clear()
        ours = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert projected == [ids.shape[0]] * layers, "beam search projected the cross keys once per beam"
        monkeypatch.setattr(modeling._EncoderRows, "of", staticmethod(lambda states: None))
        projected.clear()
        every_row = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert projected == [4 * ids.shape[0]] * layers
        monkeypatch.undo()
    assert torch.equal(ours.sequences, every_row.sequences)
    torch.testing.assert_close(ours.sequences_scores, every_row.sequences_scores, rtol=1e-5, atol=1e-5)

    model.train()
    projected.clear()
    ids = torch.randint(2, VOCAB, (2, 9)).repeat_interleave(3, 0)
    model(input_ids=ids, decoder_input_ids=torch.zeros(6, 1, dtype=torch.long), use_cache=True)
    assert projected == [6] * layers, "training projects every row (its gradient flows through each)"


def test_unknown_keywords_raise_and_the_two_cache_names_are_one_argument():
    model = make_model("v1_relu_tied", "dense")
    ids, mask = inputs()
    with pytest.raises(TypeError, match="casche"):
        model(input_ids=ids, decoder_input_ids=ids[:, :2], casche=None)
    with pytest.raises(TypeError, match="position_ids"):
        model.encoder(input_ids=ids, position_ids=None)
    cache = getattr(model(input_ids=ids, decoder_input_ids=ids[:, :2], use_cache=True), hf_compat.CACHE_NAME)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, decoder_input_ids=ids[:, 2:3], cache=cache, past_key_values=cache)


def test_config_level_defaults_and_outputs_with_labels():
    model = make_model("v11_gated_untied", "csr_0.6")
    ids, mask = inputs()
    labels = torch.randint(2, VOCAB, (3, 4))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    # as HF: with labels the cache comes back too (config.use_cache), and tuples keep HF's order
    assert getattr(out, hf_compat.CACHE_NAME) is not None and out.decoder_attentions is None
    as_tuple = model(input_ids=ids, attention_mask=mask, labels=labels, return_dict=False)
    assert len(as_tuple) == 4 and torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)
    assert getattr(model(input_ids=ids, labels=labels, use_cache=False), hf_compat.CACHE_NAME) is None
    # The same weights under a config that asks for attentions, hidden states and tuples by default.
    config = model.config.to_dict()
    config.update(output_attentions=True, output_hidden_states=True, return_dict=False)
    chatty = SparseT5ForConditionalGeneration(type(model.config).from_dict(config)).eval()
    chatty.load_state_dict(model.state_dict())
    as_tuple = chatty(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
    # loss, logits, decoder hidden states, decoder attentions, cross attentions, encoder last hidden
    # state, encoder hidden states, encoder attentions
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 8
    assert_close_to_scale(as_tuple[1], out.logits, 1e-5, what="logits")
    assert len(as_tuple[3]) == len(model.decoder.block) and len(as_tuple[7]) == len(model.encoder.block)
    assert as_tuple[3][0].shape == (3, 4, 4, 4)  # [batch, heads, queries, keys]
    assert len(as_tuple[2]) == len(model.decoder.block) + 1  # embeddings, then each block's output


def test_head_mask_drops_heads():
    model = make_model("v1_relu_tied", "csr_0.6")
    ids, mask = inputs()
    dec = ids[:, :4]
    base = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits
    ones = torch.ones(2, 4)
    same = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False, head_mask=ones,
                 decoder_head_mask=ones, cross_attn_head_mask=ones).logits
    assert_close_to_scale(same, base, 1e-5, what="all heads kept")
    off = ones.clone()
    off[:, 1] = 0
    dropped = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=False,
                    head_mask=off).logits
    assert not torch.allclose(dropped, base, atol=1e-4)
    with pytest.raises(ValueError, match="head_mask"):
        model(input_ids=ids, decoder_input_ids=dec, head_mask=torch.ones(3, 4))


def test_a_4d_decoder_mask_is_used_as_given():
    """HF's semantics: a 4D decoder mask replaces the causal mask (bool: keep; float: additive). The
    causal mask given in 4D changes nothing; HF's shared-prefix mask (three continuations of one prefix
    in one row, each hidden from the others) equals the same mask given as a 3D keep-mask, and differs
    from plain causal attention."""
    model = make_model("v11_gated_untied", "csr_0.6")
    enc_ids, _ = inputs(b=1)
    dec = torch.tensor([[0, 11, 12, 13, 14, 15]])

    def run(mask):
        return model(input_ids=enc_ids, decoder_input_ids=dec, decoder_attention_mask=mask, use_cache=False).logits

    plain = run(None)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
    additive = lambda keep: (~keep).float() * torch.finfo(torch.float32).min  # noqa: E731
    torch.testing.assert_close(run(causal), plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(additive(causal)), plain, rtol=1e-5, atol=1e-6)
    shared = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                           [1, 1, 1, 0, 1, 0], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)[None, None]
    out = run(shared)
    torch.testing.assert_close(run(additive(shared)), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run(shared[:, 0]), out, rtol=1e-5, atol=1e-6)  # the 3D keep-mask path
    torch.testing.assert_close(out[:, :4], plain[:, :4], rtol=1e-5, atol=1e-6)  # same rows as causal
    assert not torch.allclose(out[:, 4:], plain[:, 4:], atol=1e-4)  # the hidden token changed the last two
    with pytest.raises(ValueError, match="4D attention mask"):
        run(causal[..., :5])


def test_an_untested_transformers_warns_naming_the_tested_range():
    import warnings

    from packaging.version import Version

    oldest, newest = hf_compat.TESTED_TRANSFORMERS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for version in (oldest, newest):  # the tested ends
            hf_compat.check_tested_version(version)
    # What is installed: `make test` pins a tested release, but a plain `pip install -e .` (the torch
    # compat check, a user's fresh machine) resolves the newest, which may be newer than the range. The
    # installed version must be judged like any other: a warning exactly when it is outside the range.
    installed = Version(transformers.__version__).release
    outside = not (Version(oldest).release <= installed <= Version(newest).release)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_compat.check_tested_version()
    ours = [str(w.message) for w in caught if "sparse_t5" in str(w.message)]
    assert len(ours) == (1 if outside else 0), (transformers.__version__, ours)
    with pytest.warns(UserWarning, match=f"tested with transformers {oldest} to {newest}; 99.0.0 is newer"):
        hf_compat.check_tested_version("99.0.0")
    with pytest.warns(UserWarning, match=f"needs transformers >= {oldest}"):
        hf_compat.check_tested_version("4.40.0")
