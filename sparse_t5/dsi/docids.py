"""Document identifiers as token sequences (Tay et al. 2022, section 3.2).

Schemes (each maps every docid to exactly one token sequence ending in EOS, and back):
- atomic: one new token per document (<doc_i>), added to the tokenizer;
- naive: the id string, tokenised canonically by the model's tokenizer;
- random: a seeded random permutation of 0..N-1, each number tokenised as its decimal string;
- semantic: hierarchical k-means (k = 10 clusters per level, at most c = 100 documents per leaf)
  over document vectors; the path of cluster indices, then the position in the leaf, each one new
  token <c_j>. Vectors: a sentence encoder's document embeddings, as in the paper (which clustered
  BERT embeddings): all-MiniLM-L6-v2 by default, or any local HF encoder (encoder.py). Without one,
  LSA: TF-IDF of the document text reduced to 128 dimensions by truncated SVD. Either way
  deterministic for a seed.

The mapping is saved as docids.json next to the model, and reloaded with it.
"""
from __future__ import annotations

import json
import os
import random

SCHEMES = ("atomic", "naive", "random", "semantic")


class DocidMapping:
    def __init__(self, scheme: str, sequences: dict[str, list[int]], new_tokens: list[str] | None = None):
        self.scheme = scheme
        self.sequences = {d: list(s) for d, s in sequences.items()}
        self.new_tokens = list(new_tokens or [])
        inverse = {}
        for docid, seq in self.sequences.items():
            key = tuple(seq)
            if key in inverse:
                raise ValueError(f"docid scheme {scheme!r} maps {inverse[key]!r} and {docid!r} to the same tokens")
            inverse[key] = docid
        self._inverse = inverse

    def docid_of(self, tokens) -> str | None:
        return self._inverse.get(tuple(int(t) for t in tokens))

    def __len__(self):
        return len(self.sequences)

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"scheme": self.scheme, "new_tokens": self.new_tokens, "sequences": self.sequences}, f)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "DocidMapping":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"docid mapping not found: {path}")
        with open(path) as f:
            obj = json.load(f)
        return cls(obj["scheme"], obj["sequences"], obj.get("new_tokens"))


def _encode(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return list(ids) + [tokenizer.eos_token_id]


def build_docids(scheme: str, docs, tokenizer, seed: int = 0, k: int = 10, c: int = 100,
                 encoder: str | None = None, vectors=None) -> DocidMapping:
    """Build the mapping; for atomic and semantic, new tokens are added to `tokenizer` (resize the
    model's embeddings afterwards). Semantic docids cluster `vectors` (one row per document) if
    given, else the embeddings of `encoder` (a local HF encoder directory), else LSA."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown docid scheme {scheme!r}; available: {SCHEMES}")
    ids = [d.id for d in docs]
    if scheme == "atomic":
        tokens = [f"<doc_{i}>" for i in range(len(ids))]
        tokenizer.add_tokens(tokens, special_tokens=False)
        tid = tokenizer.convert_tokens_to_ids(tokens)
        return DocidMapping(scheme, {d: [t, tokenizer.eos_token_id] for d, t in zip(ids, tid)}, tokens)
    if scheme == "naive":
        return DocidMapping(scheme, {d: _encode(tokenizer, d) for d in ids})
    if scheme == "random":
        perm = list(range(len(ids)))
        random.Random(seed).shuffle(perm)
        return DocidMapping(scheme, {d: _encode(tokenizer, str(p)) for d, p in zip(ids, perm)})
    if vectors is None and encoder is not None:
        from .encoder import SentenceEncoder

        vectors = SentenceEncoder(encoder).encode_documents([d.contents for d in docs])[2]
    paths = semantic_paths([d.contents for d in docs], k=k, c=c, seed=seed, vectors=vectors)
    width = max(max(p) for p in paths) + 1
    tokens = [f"<c_{j}>" for j in range(width)]
    tokenizer.add_tokens(tokens, special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(tokens)
    return DocidMapping(scheme, {d: [tid[j] for j in p] + [tokenizer.eos_token_id] for d, p in zip(ids, paths)},
                        tokens)


def semantic_paths(texts: list[str], k: int = 10, c: int = 100, seed: int = 0, dims: int = 128,
                   vectors=None) -> list[list[int]]:
    """Hierarchical k-means paths over `vectors` (default: LSA of `texts`): cluster indices from the
    root, then the position in the leaf."""
    import numpy as np
    from sklearn.cluster import KMeans

    if vectors is None:
        vectors = lsa_vectors(texts, dims, seed)
    if len(vectors) != len(texts):
        raise ValueError(f"semantic docids: {len(vectors)} vectors for {len(texts)} documents")
    paths: list[list[int]] = [[] for _ in texts]

    def split(indices):
        if len(indices) <= c:
            for pos, i in enumerate(indices):
                paths[i].append(pos)
            return
        n_clusters = min(k, len(indices))
        labels = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed).fit_predict(vectors[indices])
        if len(set(labels)) == 1:  # identical vectors: split evenly so the recursion ends
            labels = np.arange(len(indices)) % n_clusters
        for cluster in range(n_clusters):
            members = [i for i, lab in zip(indices, labels) if lab == cluster]
            if members:
                for i in members:
                    paths[i].append(cluster)
                split(members)

    split(list(range(len(texts))))
    return paths


def lsa_vectors(texts: list[str], dims: int = 128, seed: int = 0):
    """TF-IDF reduced to `dims` dimensions by truncated SVD: the fallback without an encoder."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit_transform(texts)
    n_comp = max(1, min(dims, tfidf.shape[1] - 1, len(texts) - 1))
    return TruncatedSVD(n_components=n_comp, random_state=seed).fit_transform(tfidf) if n_comp > 1 \
        else tfidf.toarray()
