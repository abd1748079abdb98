"""How close the auto kernel policy comes to the best of its methods, with the table tuned on this
machine and with the committed one (issue 32's target: within 10% at every measured shape).

    python benches/auto_policy.py                 # t5-base's shapes, a grid off the tables' own points
    python benches/auto_policy.py --json out.json

First `sparse-t5 tune` runs with its defaults into a temporary file (not the user's cache). Then,
for each op, shape, density and token count, every forced method runs alternately on the same
inputs (sparse_t5.tune.measure, the loop tune itself times with), and each table is asked which method auto would take there
(kernel_policy.choose_method, the C++ lookup itself). A call's ratio is that method's median over
the fastest method's: both tables are judged on the same timings, and no table swap is timed. The
grid lies between the points the tables measure, so the nearest-row rule is tested where it has to
interpolate; except at 3 tokens, the CSR forward's few-token crossover, which tune measures (the
committed table's rows start at 16).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info  # noqa: E402

from sparse_t5.kernel_policy import TABLE_DIR, choose_method, load_table, select_table  # noqa: E402
from sparse_t5.tune import SHAPES, measure, tune  # noqa: E402

TOKENS = (3, 12, 48, 96, 384)
DENSITIES = (0.15, 0.4, 0.7)


def judge(rows, name: str, path: str) -> None:
    """Adds row[name] = (method auto takes under the table at `path`, its time / the best time)."""
    load_table("cpu", path)
    try:
        for r in rows:
            method = choose_method("cpu", r["op"], torch.float32, r["tokens"], r["out"], r["in"], r["density"])
            # measure() times "sparse_narrow" only where it runs another tile than "sparse"; a table row
            # nearby can still pick it where both run the same tile, the same kernel call as "sparse".
            timed = "sparse" if method == "sparse_narrow" and method not in r["ms"] else method
            r[name] = {"method": method, "vs_best": r["ms"][timed] / min(r["ms"].values())}
    finally:
        select_table("cpu")


def summarise(rows, names) -> dict:
    out = {}
    for name in names:
        v = [r[name]["vs_best"] for r in rows]
        out[name] = {"median": round(statistics.median(v), 3), "max": round(max(v), 3),
                     "within_10pct": sum(x <= 1.10 for x in v), "calls": len(v)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["t5-base"], choices=sorted(SHAPES))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", help="write rows and summary here")
    a = p.parse_args(argv)
    shapes = [s for n in a.shapes for s in SHAPES[n]]
    with tempfile.TemporaryDirectory() as cache:
        tuned_path = os.path.join(cache, "tuned.json")
        tuned = tune(shapes, path=tuned_path)  # the defaults of `sparse-t5 tune`, not into the user's cache
        rows = measure("cpu", (torch.float32,), shapes, TOKENS, DENSITIES, a.rounds)  # tune's own timing loop
        judge(rows, "tuned", tuned_path)
    judge(rows, "committed", os.path.join(TABLE_DIR, "cpu.json"))
    for r in rows:
        if max(r["tuned"]["vs_best"], r["committed"]["vs_best"]) > 1.10:
            print(json.dumps(r))
    result = {"machine": machine_info(), "tune_seconds": tuned["seconds"], "tune_rows": tuned["rows"],
              "summary": summarise(rows, ("tuned", "committed")), "rows": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
