"""Retrieval with a DSI model.

- Constrained beam search over a trie of the valid docid token sequences, two ways:
  `prefix_allowed_tokens_fn` (a Python callback per hypothesis and step) and `TrieLogitsProcessor`
  (a vectorised transition table: one gather per decoded position for the whole batch, then one
  masked fill). benches/test_bench_dsi_decoding.py measures both; `retrieve` uses the processor.
  Every node allows at least one token (a finished or invalid hypothesis may only emit pad), and the
  decoder start token is the root, so the allowed set is never empty.
- Rescoring: the teacher-forced log p(docid | query) of given candidates (e.g. BM25's top 1000),
  in batches; this is how Recall@1000 and MAP over 1000 candidates are computed affordably.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from .docids import DocidMapping


class DocidTrie:
    """Trie of docid sequences, with a dense transition table for the vectorised processor."""

    def __init__(self, mapping: DocidMapping, vocab_size: int, pad_token_id: int = 0):
        self.mapping = mapping
        self.vocab_size = vocab_size
        self.pad = pad_token_id
        children: list[dict[int, int]] = [{}]
        for seq in mapping.sequences.values():
            node = 0
            for tok in seq:
                if tok >= vocab_size:
                    raise ValueError(f"docid token {tok} is outside the model's vocabulary ({vocab_size})")
                nxt = children[node].get(tok)
                if nxt is None:
                    nxt = len(children)
                    children[node][tok] = nxt
                    children.append({})
                node = nxt
        self.children = children
        n = len(children)
        dead = n  # the sink: after EOS or off the trie; only pad is allowed there
        self.next_node = torch.full((n + 1, vocab_size), dead, dtype=torch.int32)
        self.allowed = torch.zeros((n + 1, vocab_size), dtype=torch.bool)
        for node, kids in enumerate(children):
            for tok, child in kids.items():
                self.next_node[node, tok] = child
                self.allowed[node, tok] = True
            if not kids:
                self.allowed[node, pad_token_id] = True
        self.allowed[dead, pad_token_id] = True

    def allowed_tokens(self, prefix) -> list[int]:
        """Tokens allowed after `prefix` (decoder start token excluded); never empty."""
        node = 0
        for tok in prefix:
            node = self.children[node].get(int(tok), -1) if node >= 0 else -1
            if node < 0:
                return [self.pad]
        kids = list(self.children[node])
        return kids or [self.pad]

    def prefix_allowed_tokens_fn(self):
        return lambda batch_id, sent: self.allowed_tokens(sent[1:].tolist())


class TrieLogitsProcessor(LogitsProcessor):
    def __init__(self, trie: DocidTrie):
        self.trie = trie

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        nodes = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        table = self.trie.next_node.to(input_ids.device)
        for t in range(1, input_ids.shape[1]):  # position 0 is the decoder start token
            nodes = table[nodes, input_ids[:, t]].long()
        allowed = self.trie.allowed.to(scores.device)[nodes]
        return scores.masked_fill(~allowed[:, : scores.shape[1]], float("-inf"))


@torch.no_grad()
def retrieve(model, tokenizer, mapping: DocidMapping, queries: dict[str, str], beam: int = 10,
             batch_size: int = 16, max_query_len: int = 64, mode: str = "processor") -> dict[str, dict[str, float]]:
    """{qid: {docid: score}}: constrained beam search, up to `beam` distinct valid docids per query,
    ranked by sequence log-probability."""
    model.eval()
    trie = DocidTrie(mapping, model.config.vocab_size, tokenizer.pad_token_id)
    max_len = max(len(s) for s in mapping.sequences.values()) + 1
    kwargs = {}
    if mode == "processor":
        kwargs["logits_processor"] = LogitsProcessorList([TrieLogitsProcessor(trie)])
    elif mode == "prefix_fn":
        kwargs["prefix_allowed_tokens_fn"] = trie.prefix_allowed_tokens_fn()
    else:
        raise ValueError(f"mode must be 'processor' or 'prefix_fn', got {mode!r}")
    qids = list(queries)
    run: dict[str, dict[str, float]] = {}
    for i in range(0, len(qids), batch_size):
        chunk = qids[i:i + batch_size]
        enc = tokenizer([queries[q] for q in chunk], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_query_len)
        enc = enc.to(model.device)
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, num_beams=beam,
                             num_return_sequences=beam, max_length=max_len, early_stopping=True,
                             output_scores=True, return_dict_in_generate=True, do_sample=False, **kwargs)
        seqs = out.sequences.view(len(chunk), beam, -1)
        scores = out.sequences_scores.view(len(chunk), beam)
        for row, qid in enumerate(chunk):
            ranked: dict[str, float] = {}
            for j in range(beam):
                toks = seqs[row, j, 1:].tolist()
                if tokenizer.eos_token_id in toks:  # finished hypotheses are padded after EOS (with EOS or pad)
                    toks = toks[: toks.index(tokenizer.eos_token_id) + 1]
                docid = mapping.docid_of(toks)
                if docid is not None and docid not in ranked:  # drop invalid and duplicate ids
                    ranked[docid] = float(scores[row, j])
            run[qid] = ranked
    return run


@torch.no_grad()
def rescore(model, tokenizer, mapping: DocidMapping, queries: dict[str, str], candidates: dict[str, list[str]],
            batch_size: int = 256, max_query_len: int = 64) -> dict[str, dict[str, float]]:
    """{qid: {docid: log p(docid | query)}} for the given candidate docids, teacher-forced."""
    model.eval()
    start = model.config.decoder_start_token_id
    run = {}
    for qid, cands in candidates.items():
        cands = [d for d in cands if d in mapping.sequences]
        if not cands:
            run[qid] = {}
            continue
        enc = tokenizer([queries[qid]], return_tensors="pt", truncation=True, max_length=max_query_len).to(model.device)
        encoder_out = model.get_encoder()(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        scores = {}
        for i in range(0, len(cands), batch_size):
            chunk = cands[i:i + batch_size]
            width = max(len(mapping.sequences[d]) for d in chunk)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, d in enumerate(chunk):
                seq = mapping.sequences[d]
                labels[r, : len(seq)] = torch.tensor(seq)
            labels = labels.to(model.device)
            dec_in = labels.clamp(min=0).roll(1, dims=1)
            dec_in[:, 0] = start
            hidden = encoder_out.last_hidden_state.expand(len(chunk), -1, -1)
            logits = model(encoder_outputs=(hidden,), attention_mask=enc.attention_mask.expand(len(chunk), -1),
                           decoder_input_ids=dec_in, use_cache=False).logits
            logp = torch.log_softmax(logits.float(), -1)
            token_lp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels >= 0)
            for r, d in enumerate(chunk):
                scores[d] = float(token_lp[r].sum())
        run[qid] = scores
    return run
