"""IR metrics with trec_eval semantics, computed by ir_measures (pytrec_eval underneath).

MAP, Recall@1000, MRR@10, Hits@1 and Hits@10 (Success@k), plus Recall@k for the beam size. Every
query that has judgments counts: a query with no retrieved document scores 0 (trec_eval -c), so a
model that returns nothing for a query is not averaged away. Two protocols:
- "qrels": the given relevance judgments;
- "bm25": the DSI pruning study's protocol, where each query's BM25 top-K labels are its relevant set.
Every evaluation also writes a TREC run file.
"""
from __future__ import annotations

import os

import ir_measures
from ir_measures import AP, R, RR, Success

NAMES = {"MAP": AP, "R@1000": R @ 1000, "MRR@10": RR @ 10, "Hits@1": Success @ 1, "Hits@10": Success @ 10}


def measures_for(beam: int | None = None) -> dict:
    measures = dict(NAMES)
    if beam and beam not in (10, 1000):
        measures[f"R@{beam}"] = R @ beam
    return measures


def evaluate(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]], beam: int | None = None) -> dict:
    """Mean of each measure over all judged queries (missing or empty results count as 0)."""
    measures = measures_for(beam)
    judged = [q for q, rels in qrels.items() if any(r > 0 for r in rels.values())]
    per_query = {name: {q: 0.0 for q in judged} for name in measures}
    by_measure = {m: name for name, m in measures.items()}
    run = {q: docs for q, docs in run.items() if docs and q in qrels}
    if run:
        for metric in ir_measures.iter_calc(list(measures.values()), qrels, run):
            name = by_measure[metric.measure]
            if metric.query_id in per_query[name]:
                per_query[name][metric.query_id] = float(metric.value)
    return {name: (sum(v.values()) / len(v) if v else 0.0) for name, v in per_query.items()}


def qrels_from_labels(pairs: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for qid, docid in pairs:
        qrels.setdefault(qid, {})[docid] = 1
    return qrels


def write_run(run: dict[str, dict[str, float]], path: str, tag: str) -> None:
    """TREC run format: qid Q0 docid rank score tag."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for qid in sorted(run):
            for rank, (docid, score) in enumerate(sorted(run[qid].items(), key=lambda kv: -kv[1]), 1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")
    os.replace(tmp, path)
