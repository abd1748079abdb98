"""DSI data: corpus, queries, qrels, splits, the embedded offline dataset, and the tokenizer.

Formats:
- corpus: JSONL, one {"id": str, "contents": str} per line (Pyserini's JsonCollection format);
- queries: TSV "qid<TAB>text" or JSONL {"id" (or "qid"): str, "text" (or "query", "contents"): str};
- qrels: TREC "qid 0 docid relevance".
A malformed line raises DataError naming the file and the line number.

The embedded dataset is the Lee corpus (300 Australian news articles shipped inside gensim's wheel,
gensim/test/test_data/lee_background.cor). Its queries are noisy known-item queries, built so that
none is copied from the indexing input: each takes a sentence from the document's text *after* the
first `index_words` words (which are what the model is trained to index), keeps a random subset of
its content words (stopwords dropped, no more than 8 words) and shuffles them. Each query's qrel is
its source document. Built on first use, offline.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

DEFAULT_SPLIT = (0.7, 0.1, 0.2)  # train / validation / test, as in the DSI pruning study


class DataError(ValueError):
    """A missing or malformed data file; the message names the file and the line."""


@dataclass
class Document:
    id: str
    contents: str


@dataclass
class DSIData:
    corpus: list[Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    def doc_ids(self) -> list[str]:
        return [d.id for d in self.corpus]


def _open(path: str, what: str):
    if not os.path.isfile(path):
        raise DataError(f"{what} file not found: {path}")
    return open(path, encoding="utf-8")


def load_corpus(path: str) -> list[Document]:
    docs, seen = [], set()
    with _open(path, "corpus") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or "id" not in obj or "contents" not in obj:
                raise DataError(f"{path}:{n}: expected an object with 'id' and 'contents'")
            doc_id, text = str(obj["id"]), obj["contents"]
            if not isinstance(text, str) or not doc_id.strip():
                raise DataError(f"{path}:{n}: 'id' must be non-empty and 'contents' a string")
            if doc_id in seen:
                raise DataError(f"{path}:{n}: duplicate document id {doc_id!r}")
            seen.add(doc_id)
            docs.append(Document(doc_id, text))
    if not docs:
        raise DataError(f"{path}: the corpus is empty")
    return docs


def load_queries(path: str) -> dict[str, str]:
    queries = {}
    with _open(path, "queries") as f:
        is_jsonl = path.endswith((".jsonl", ".json"))
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if is_jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from None
                qid = obj.get("id", obj.get("qid")) if isinstance(obj, dict) else None
                text = next((obj[k] for k in ("text", "query", "contents") if k in obj), None) \
                    if isinstance(obj, dict) else None
                if qid is None or not isinstance(text, str):
                    raise DataError(f"{path}:{n}: expected an object with 'id' (or 'qid') and 'text'")
            else:
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2 or not parts[0].strip():
                    raise DataError(f"{path}:{n}: expected 'qid<TAB>text', got {len(parts)} field(s)")
                qid, text = parts
            qid = str(qid)
            if qid in queries:
                raise DataError(f"{path}:{n}: duplicate query id {qid!r}")
            queries[qid] = text
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries


def load_qrels(path: str) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with _open(path, "qrels") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 4:
                raise DataError(f"{path}:{n}: expected TREC qrels 'qid 0 docid relevance', got {len(parts)} fields")
            try:
                rel = int(parts[3])
            except ValueError:
                raise DataError(f"{path}:{n}: relevance must be an integer, got {parts[3]!r}") from None
            qrels.setdefault(parts[0], {})[parts[2]] = rel
    return qrels


def write_corpus(docs: list[Document], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d.id, "contents": d.contents}) + "\n")


def load(corpus: str, queries: str, qrels: str | None = None) -> DSIData:
    data = DSIData(load_corpus(corpus), load_queries(queries), load_qrels(qrels) if qrels else {})
    ids = set(data.doc_ids())
    for qid, rels in data.qrels.items():
        unknown = [d for d in rels if d not in ids]
        if unknown:
            raise DataError(f"{qrels}: query {qid} judges documents not in the corpus: {unknown[:3]}")
    return data


def split_queries(qids: list[str], fractions=DEFAULT_SPLIT, seed: int = 0) -> dict[str, list[str]]:
    """Seeded, deterministic train / validation / test split of query ids."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    order = sorted(qids)
    random.Random(seed).shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    return {"train": order[:n_train], "validation": order[n_train:n_train + n_val],
            "test": order[n_train + n_val:]}


# ---- the embedded offline dataset -----------------------------------------------------------------
_STOPWORDS = set("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he
her here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now
of off on once only or other our ours ourselves out over own said same she should so some such than that the their
theirs them themselves then there these they this those through to too under until up very was we were what when
where which while who whom why will with would you your yours yourself yourselves also says say mr mrs ms""".split())


def lee_corpus_path() -> str:
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", "lee_background.cor")
    if not os.path.isfile(path):
        raise DataError(f"the Lee corpus is missing from the installed gensim: {path}")
    return path


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 6]


def _noisy_query(sentence: str, rng: random.Random) -> str | None:
    words = [w.lower() for w in re.findall(r"[A-Za-z][A-Za-z'-]+|\d+", sentence)]
    content = [w for w in words if w not in _STOPWORDS]
    if len(content) < 4:
        return None
    keep = rng.sample(content, k=min(len(content), rng.randint(4, 8)))
    rng.shuffle(keep)
    return " ".join(keep)


def build_lee_dataset(out_dir: str, queries_per_doc: int = 2, index_words: int = 64, seed: int = 0) -> dict:
    """Write corpus.jsonl, queries.tsv and qrels.txt of the embedded dataset to out_dir (once)."""
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("corpus", "corpus.jsonl"), ("queries", "queries.tsv"), ("qrels", "qrels.txt"))}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    with open(lee_corpus_path(), encoding="latin-1") as f:
        texts = [" ".join(line.split()) for line in f if line.strip()]
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    queries, qrels = {}, {}
    for doc in docs:
        words = doc.contents.split()
        tail = " ".join(words[index_words:]) if len(words) > index_words + 10 else " ".join(words[len(words) // 2:])
        candidates = _sentences(tail) or [tail]
        rng.shuffle(candidates)
        made = 0
        for sentence in candidates:
            q = _noisy_query(sentence, rng)
            if q is None:
                continue
            qid = f"q{doc.id}_{made}"
            queries[qid], qrels[qid] = q, {doc.id: 1}
            made += 1
            if made == queries_per_doc:
                break
    tmp = {k: p + ".tmp" for k, p in paths.items()}
    write_corpus(docs, tmp["corpus"])
    with open(tmp["queries"], "w", encoding="utf-8") as f:
        for qid, text in queries.items():
            f.write(f"{qid}\t{text}\n")
    with open(tmp["qrels"], "w", encoding="utf-8") as f:
        for qid, rels in qrels.items():
            for doc_id, rel in rels.items():
                f.write(f"{qid} 0 {doc_id} {rel}\n")
    for k in paths:
        os.replace(tmp[k], paths[k])
    return paths


# ---- tokenizer ------------------------------------------------------------------------------------------
def load_or_train_tokenizer(path: str | None, texts: list[str], out_dir: str, vocab_size: int = 4000):
    """An HF tokenizer from a local path, or (with none given) a SentencePiece unigram tokenizer
    trained on `texts` and saved to out_dir, with T5's special ids: pad 0, eos 1, unk 2.

    Trained by the sentencepiece library with one thread, which is deterministic: the same texts give
    the same tokenizer in every run. (The `tokenizers` library's unigram trainer gave a different
    vocabulary on every run, even single-threaded, and with it different training downstream.) The
    trained pieces and scores become a `tokenizers` Unigram model, the fast tokenizer HF users expect."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path:
        if not os.path.exists(path):
            raise DataError(f"tokenizer not found: {path}")
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(out_dir)
    import io

    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import SentencePieceUnigramTokenizer, Tokenizer
    from tokenizers.models import Unigram
    from tokenizers.processors import TemplateProcessing

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        num_threads=1, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    vocab = [(piece.piece, piece.score) for piece in proto.pieces]
    spm = SentencePieceUnigramTokenizer(vocab=vocab, replacement="\u2581", add_prefix_space=True)
    spm._tokenizer.model = Unigram(vocab, 2, False)  # the constructor leaves unk unset
    spm.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(spm.to_str()), pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>")
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok
