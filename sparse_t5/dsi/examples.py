"""Training examples for DSI: indexing (whole documents as token windows, and pseudo-queries generated
from the document text) and retrieval (labelled training queries).

- Windows: every document contributes all of its text, as windows of `index_tokens` tokens every
  `stride` tokens (the last window ends at the document's end), each labelled with its docid. The
  first-64-tokens-only indexing of the original DSI never showed the model the text that most
  queries come from; on the embedded dataset that left the model at chance (issue 16).
- Pseudo-queries (DSI-QG, NCI): `n` per document, made from that document's text only, never from
  validation or test queries.
  - `KeywordSpanGenerator` (the default, offline): alternately a bag of 3-8 content words of one
    sentence, lowercased and shuffled (what a searcher types), and a contiguous span of 4-12 words
    (NCI's document-span queries). Its own seeded stream per document, independent of the seeds
    that built any query set.
  - `Seq2SeqQueryGenerator`: a local doc2query-style HF seq2seq checkpoint (`--qg-model PATH`)
    samples them (top-k sampling, as DSI-QG does).
- Mixing: indexing examples (windows and pseudo-queries) and retrieval examples are mixed at
  `index_ratio` indexing examples per retrieval example. The smaller side is cycled (all of it, then
  a seeded sample of the remainder), so every epoch, a shuffle of this list, holds exactly that ratio.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .data import _STOPWORDS, _sentences


@dataclass
class Example:
    text: str
    docid: str
    kind: str  # "index" (a document window) | "pseudo" (a pseudo-query) | "query" (a labelled query)


def document_windows(text: str, tokenizer, index_tokens: int, stride: int | None = None) -> list[str]:
    """The document as windows of `index_tokens` tokens every `stride` tokens (default: no overlap),
    covering all of it; each window is decoded back to text (the trainer tokenises text)."""
    if index_tokens < 1:
        raise ValueError(f"index_tokens must be >= 1, got {index_tokens}")
    stride = stride or index_tokens
    if not 1 <= stride <= index_tokens:
        raise ValueError(f"index_stride must be in [1, index_tokens={index_tokens}], got {stride}")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= index_tokens:
        return [tokenizer.decode(ids)] if ids else []
    starts = list(range(0, len(ids) - index_tokens + 1, stride))
    if starts[-1] + index_tokens < len(ids):  # the tail: one more window ending at the last token
        starts.append(len(ids) - index_tokens)
    return [tokenizer.decode(ids[s:s + index_tokens]) for s in starts]


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+|\d+")


class KeywordSpanGenerator:
    """Offline pseudo-queries from a document's own text (see the module docstring)."""

    name = "keywords+spans"
    resample = True  # cheap: a fresh draw every epoch (ResampledExamples)

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, doc_id: str, text: str, n: int, draw: int = 0) -> list[str]:
        # A string seed is hashed with SHA-512 by `random`: the same stream in every process. `draw`
        # numbers independent draws (one per epoch when resampled).
        rng = random.Random(f"pseudo-queries:{self.seed}:{draw}:{doc_id}")
        sentences = _sentences(text) or [text]
        out = []
        for i in range(n):
            words = _WORD.findall(sentences[rng.randrange(len(sentences))])
            if i % 2 == 0:  # keyword bag
                content = [w.lower() for w in words if w.lower() not in _STOPWORDS]
                if len(content) >= 3:
                    bag = rng.sample(content, k=min(len(content), rng.randint(3, 8)))
                    rng.shuffle(bag)
                    out.append(" ".join(bag))
                    continue
            if words:  # span
                length = min(len(words), rng.randint(4, 12))
                start = rng.randrange(len(words) - length + 1)
                out.append(" ".join(words[start:start + length]))
        return out


class Seq2SeqQueryGenerator:
    """Pseudo-queries sampled from a local doc2query-style HF seq2seq checkpoint (DSI-QG). Sampling
    a model per document per epoch costs more than the training it feeds, so its pseudo-queries are
    drawn once (`resample = False`: every epoch reuses draw 0)."""

    resample = False

    def __init__(self, path: str, seed: int = 0, max_input_tokens: int = 256, max_new_tokens: int = 32,
                 top_k: int = 10, batch_size: int = 8, device: str = "cpu"):
        import os

        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if not os.path.isdir(path):
            raise ValueError(f"--qg-model must be a local HF seq2seq checkpoint directory, got {path!r}")
        self.name = f"seq2seq:{os.path.basename(os.path.normpath(path))}"
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True).to(device).eval()
        self.seed, self.device = seed, device
        self.max_input_tokens, self.max_new_tokens, self.top_k = max_input_tokens, max_new_tokens, top_k

    def __call__(self, doc_id: str, text: str, n: int, draw: int = 0) -> list[str]:
        import torch

        if n <= 0:
            return []
        # Seeded per document, so the pseudo-queries do not depend on the order documents are visited.
        torch.manual_seed(random.Random(f"qg:{self.seed}:{doc_id}").getrandbits(63))
        enc = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_input_tokens)
        with torch.no_grad():
            out = self.model.generate(**enc.to(self.device), do_sample=True, top_k=self.top_k,
                                      max_new_tokens=self.max_new_tokens, num_return_sequences=n)
        return [q.strip() for q in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def make_examples(docs, train_queries: dict[str, str], labels: list[tuple[str, str]], tokenizer,
                  index_tokens: int, index_ratio: float, seed: int, index_stride: int | None = None,
                  pseudo_queries: int = 0, generator=None, draw: int = 0,
                  windows: dict[str, list[str]] | None = None) -> list[Example]:
    """Windows and pseudo-queries of every document, plus the labelled training queries, mixed at
    `index_ratio` indexing examples per retrieval example (module docstring). `draw` selects the
    generator's draw of pseudo-queries; each document gets exactly `pseudo_queries` of them (its
    draw cycled if the generator returned fewer), so every draw gives the same number of examples.
    `windows` (doc id -> its windows) reuses the windows of an earlier call (ResampledExamples)."""
    if index_ratio <= 0:
        raise ValueError(f"index_ratio must be > 0, got {index_ratio}")
    if pseudo_queries < 0:
        raise ValueError(f"pseudo_queries must be >= 0, got {pseudo_queries}")
    generator = generator or KeywordSpanGenerator(seed)
    indexing = []
    for doc in docs:
        doc_windows = windows[doc.id] if windows is not None else document_windows(doc.contents, tokenizer,
                                                                                     index_tokens, index_stride)
        indexing += [Example(w, doc.id, "index") for w in doc_windows]
        if pseudo_queries:
            made = [q for q in generator(doc.id, doc.contents, pseudo_queries, draw=draw) if q]
            indexing += [Example(q, doc.id, "pseudo") for q in _cycle(made, pseudo_queries, None)] if made else []
    retrieval = [Example(train_queries[q], d, "query") for q, d in labels if q in train_queries]
    if not retrieval:
        return indexing
    rng = random.Random(seed)
    if len(indexing) >= index_ratio * len(retrieval):
        retrieval = _cycle(retrieval, round(len(indexing) / index_ratio), rng)
    else:
        indexing = _cycle(indexing, round(index_ratio * len(retrieval)), rng)
    return indexing + retrieval


def _cycle(items: list, count: int, rng: random.Random | None) -> list:
    """`count` items: all of `items` as many whole times as fit, then a seeded sample of the rest
    (with no rng: the first ones)."""
    whole, rest = divmod(max(count, len(items)), len(items))
    return items * whole + (rng.sample(items, rest) if rng else items[:rest])


class ResampledExamples:
    """The training examples of each epoch, with the pseudo-queries drawn afresh for that epoch
    (draw = epoch) when the generator is cheap enough (`generator.resample`); windows and labelled
    queries are the same every epoch. A fixed set of pseudo-queries is memorised within a few epochs
    (training loss near 0 while validation stalls); fresh draws keep teaching which words point to
    which document, and they are a function of (seed, epoch), so a resumed run sees the same data.
    Every epoch has the same number of examples (make_examples), so the schedule's length is known."""

    def __init__(self, make, resample: bool):
        self._make, self.resample = make, resample
        self._cache: tuple[int, list[Example]] | None = None

    def for_epoch(self, epoch: int) -> list[Example]:
        draw = epoch if self.resample else 0
        if self._cache is None or self._cache[0] != draw:
            self._cache = (draw, self._make(draw))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.for_epoch(0))

    def __iter__(self):
        return iter(self.for_epoch(0))
