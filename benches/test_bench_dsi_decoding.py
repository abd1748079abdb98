"""Constrained beam search: the vectorised TrieLogitsProcessor against prefix_allowed_tokens_fn, on
the same model, queries and docids (the embedded Lee corpus, 300 documents, beam 10).

    pytest benches/test_bench_dsi_decoding.py
"""
import copy
import os
import tempfile

import pytest

from sparse_t5.dsi.data import build_lee_dataset, load, load_or_train_tokenizer
from sparse_t5.dsi.decoding import retrieve
from sparse_t5.dsi.docids import build_docids
from sparse_t5.dsi.pipeline import RunConfig, new_model

_CACHE = {}


def setup(scheme):
    if scheme not in _CACHE:
        root = os.path.join(tempfile.gettempdir(), "sparse_t5_bench_lee")
        paths = build_lee_dataset(os.path.join(root, "data"))
        data = load(paths["corpus"], paths["queries"], paths["qrels"])
        tok = copy.deepcopy(load_or_train_tokenizer(None, [d.contents for d in data.corpus], os.path.join(root, "tok")))
        mapping = build_docids(scheme, data.corpus, tok)
        model = new_model(RunConfig(model_size="mini"), tok)
        queries = dict(list(data.queries.items())[:32])
        _CACHE[scheme] = (model, tok, mapping, queries)
    return _CACHE[scheme]


@pytest.mark.parametrize("mode", ["prefix_fn", "processor"])
@pytest.mark.parametrize("scheme", ["atomic", "semantic"])
def test_constrained_decoding(record, scheme, mode):
    model, tok, mapping, queries = setup(scheme)
    # "dense" is the baseline column of the ratio table: here it is prefix_allowed_tokens_fn
    provider = "dense" if mode == "prefix_fn" else "processor"
    record(f"dsi constrained beam 10, 32 queries, {scheme} docids (dense = prefix_allowed_tokens_fn)", provider,
           lambda: retrieve(model, tok, mapping, queries, beam=10, mode=mode), rounds=3, warmup=1)
