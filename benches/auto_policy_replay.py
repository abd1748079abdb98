"""Replay saved `benches/auto_policy.py --json` runs against a method table under other lookup rules,
to judge a rule before it goes into the C++ lookup (csrc/kernel_policy.cpp), without re-timing.

    python benches/auto_policy.py --json run1.json     # (a few times)
    python benches/auto_policy_replay.py run1.json run2.json [--table sparse_t5/kernel_tables/cpu.json]

Rules: "shipped" (the C++ lookup itself, kernel_policy.choose_method, over the table),
"nearest-split" (the nearest row, with log2 out and log2 in as separate axes), and inverse-distance
weighting of the rows' measured log time ratios over the k nearest rows ("idw-k<k>-p<p>", weights
1/distance^p, split axes). Each call is judged as auto_policy.py judges it: the chosen method's
median over the fastest method's in that run.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from sparse_t5.kernel_policy import choose_method, load_table, select_table

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sparse_t5", "kernel_tables", "cpu.json")


def features(r):
    return (math.log2(r["tokens"]), math.log2(r["out"]), math.log2(r["in"]), math.log2(max(r["density"], 1e-9)))


def shipped(call):
    return choose_method("cpu", call["op"], torch.float32, call["tokens"], call["out"], call["in"], call["density"])


def rule(table_rows, k=None, p=1.0):
    """The nearest row's method (k None) or inverse-distance weighting over the k nearest rows, with
    out and in as separate axes."""
    rows = [(r, features(r)) for r in table_rows if r["dtype"] == "float32"]

    def choose(call):
        f = features(call)
        near = sorted(((sum(abs(a - b) for a, b in zip(f, g)), r) for r, g in rows if r["op"] == call["op"]),
                      key=lambda t: t[0])
        if k is None or near[0][0] < 1e-9:
            return near[0][1]["method"]
        est = {"sparse": 0.0}
        for m in ("dense", "mkl"):
            w = [(1 / d ** p, math.log(r["ms"][m] / r["ms"]["sparse"])) for d, r in near[:k] if m in r["ms"]]
            if w:
                est[m] = sum(a * b for a, b in w) / sum(a for a, _ in w)
        return min(est, key=est.get)
    return choose


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="auto_policy.py --json outputs")
    p.add_argument("--table", default=TABLE)
    a = p.parse_args(argv)
    table = json.load(open(a.table))["rows"]
    rules = {"shipped": shipped, "nearest-split": rule(table)}
    rules.update({f"idw-k{k}-p{q:g}": rule(table, k, q) for k in (2, 4, 8, 16) for q in (1, 2)})
    load_table("cpu", a.table)
    try:
        for path in a.runs:
            calls = json.load(open(path))["rows"]
            for name, choose in rules.items():
                v = [c["ms"][choose(c)] / min(c["ms"].values()) for c in calls]
                print(f"{os.path.basename(path)} {name:14s} within 10%: {sum(x <= 1.10 for x in v)}/{len(v)} "
                      f"worst {max(v):.2f}x mean {sum(v) / len(v):.3f}x")
    finally:
        select_table("cpu")


if __name__ == "__main__":
    main()
