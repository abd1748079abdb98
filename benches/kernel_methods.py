"""Measure every exact method of every sparse op and write the table `kernel_policy("auto")` uses.

    python benches/kernel_methods.py                      # CPU: writes sparse_t5/kernel_tables/cpu.json
    python benches/kernel_methods.py --device cuda        # GPU: writes sparse_t5/kernel_tables/cuda.json
    python benches/kernel_methods.py --quick --out /tmp/t.json   # a smaller grid

The committed table is the fallback of the auto policy on a machine that has not run
`sparse-t5 tune` (sparse_t5/tune.py, which measures the same way for one machine and model).
For each (op, dtype, tokens, out x in, density) the methods run alternately on the same inputs
(sparse_t5.tune.time_interleaved) and the faster one becomes the table's row. Beside the two methods,
the forward rows also time dense `F.linear` on the uncompressed weight (what the sparse layer
replaces), and on CPU `torch.sparse.mm` on MKL CSR, so every ratio in the table is from one run.
Each row records the medians, so the table says by how much each method won, not only which.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info  # noqa: E402

from sparse_t5.kernel_policy import TABLE_DIR  # noqa: E402
from sparse_t5.tune import CSR_DENSITIES, SHAPES, TABLE_RULE, measure, write_table  # noqa: E402

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="t5-small and t5-base shapes, 16/256 tokens, 0.2/0.8")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds per method (default: 5 CPU, 20 CUDA)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="dtypes to measure (default: float32 on CPU, where training runs in fp32; "
                        "float32 bfloat16 float16 on CUDA)")
    p.add_argument("--out", default=None, help="table path (default: sparse_t5/kernel_tables/<cpu|cuda>.json)")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    dtypes = ([getattr(torch, d) for d in a.dtypes] if a.dtypes else
              [torch.float32, torch.bfloat16, torch.float16] if cuda else [torch.float32])
    names = ["t5-small", "t5-base"] if a.quick or not cuda else list(SHAPES)
    shapes = [s for n in names for s in SHAPES[n]]
    tokens = [16, 256] if a.quick else ([16, 64, 1024, 8192] if cuda else [16, 64, 256, 1024])
    densities = (0.2, 0.8) if a.quick else CSR_DENSITIES
    t0 = time.perf_counter()
    rows = measure(a.device, dtypes, shapes, tokens, densities, a.rounds or (20 if cuda else 5), references=True,
                   log=lambda s: print(s, flush=True))
    info = machine_info()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
    table = {"device_class": "cuda" if cuda else "cpu", "machine": info, "seconds": round(time.perf_counter() - t0),
             "rule": TABLE_RULE, "rows": rows}
    path = a.out or os.path.join(TABLE_DIR, f"{table['device_class']}.json")
    write_table(path, table)
    print(f"wrote {path}: {len(rows)} rows in {table['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
