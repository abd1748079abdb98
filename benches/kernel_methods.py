"""Measure every exact method of every sparse op and write the table `kernel_policy("auto")` uses.

    python benches/kernel_methods.py                      # CPU: writes sparse_t5/kernel_tables/cpu.json
    python benches/kernel_methods.py --device cuda        # GPU: writes sparse_t5/kernel_tables/cuda.json
    python benches/kernel_methods.py --quick --out /tmp/t.json   # a smaller grid

For each (op, dtype, tokens, out x in, density) the methods run alternately on the same inputs
(bench_utils.time_interleaved) and the faster one becomes the table's row. Beside the two methods,
the forward rows also time dense `F.linear` on the uncompressed weight (what the sparse layer
replaces), and on CPU `torch.sparse.mm` on MKL CSR, so every ratio in the table is from one run.
Each row records the medians, so the table says by how much each method won, not only which.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import machine_info, time_interleaved  # noqa: E402

from sparse_t5 import SparseLinear  # noqa: E402
from sparse_t5.kernel_policy import TABLE_DIR, kernel_policy  # noqa: E402

ops = torch.ops.sparse_t5
# (out, in) of the Linear layers of T5 checkpoints: FFN wi / wo and attention projections.
SHAPES = {
    "t5-small": [(2048, 512), (512, 2048), (512, 512)],
    "t5-base": [(3072, 768), (768, 3072), (768, 768)],
    "t5-large": [(4096, 1024), (1024, 4096), (1024, 1024)],
    "t5-xl": [(5120, 2048), (2048, 5120), (2048, 2048)],
}
CSR_DENSITIES = (0.1, 0.2, 0.5, 0.8)


def layer(fmt: str, out: int, in_: int, density: float, dtype, device):
    lin = torch.nn.Linear(in_, out, bias=False).to(device=device, dtype=dtype)
    if fmt == "2:4":
        return SparseLinear.from_dense(lin, format="2:4"), lin
    mask = torch.rand(out, in_, device=device) < density
    return SparseLinear.from_dense(lin, mask, format="csr"), lin


def calls(fmt: str, sl, x, dy):
    """op name -> callable running that op once on these inputs."""
    if fmt == "csr":
        a = (sl.row_ptr, sl.col_idx, sl.out_features, sl.in_features)
        return {"csr_linear": lambda: ops.csr_linear(x, sl.values, *a),
                "csr_linear_backward_input": lambda: ops.csr_linear_backward_input(dy, sl.values, *a),
                "csr_sddmm": lambda: ops.csr_sddmm(dy, x, *a)}
    return {"semi24_linear": lambda: ops.semi24_linear(x, sl.values, sl.meta),
            "semi24_linear_backward_input": lambda: ops.semi24_linear_backward_input(dy, sl.values, sl.meta),
            "semi24_sddmm": lambda: ops.semi24_sddmm(dy, x, sl.meta)}


def _semi_structured(w, x):
    """torch's semi-structured (2:4) weight, or None where this dtype / shape / GPU lacks it."""
    try:
        from torch.sparse import to_sparse_semi_structured

        semi = to_sparse_semi_structured(w)
        F.linear(x, semi)
        return semi
    except Exception:  # noqa: BLE001 - unsupported combinations raise several types
        return None


def forced(policy: str, fn, sync):
    def run():
        with kernel_policy(policy):
            fn()
        sync()
    return run


def measure(device: str, dtypes, shapes, tokens_list, densities, rounds: int, log=print) -> list[dict]:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    rows = []
    torch.manual_seed(0)
    for dtype in dtypes:
        for out, in_ in shapes:
            for fmt, dens in [("csr", d) for d in densities] + [("2:4", 0.5)]:
                sl, lin = layer(fmt, out, in_, dens, dtype, device)
                density = sl.nnz / (out * in_)
                for tokens in tokens_list:
                    x = torch.randn(tokens, in_, device=device, dtype=dtype)
                    dy = torch.randn(tokens, out, device=device, dtype=dtype)
                    with torch.no_grad():
                        for op, fn in calls(fmt, sl, x, dy).items():
                            fns = {"sparse": forced("sparse", fn, sync), "dense": forced("dense", fn, sync)}
                            if op.endswith("_linear"):  # references for the forward
                                w = lin.weight.detach() * sl.mask().to(dtype)
                                fns["F.linear"] = lambda w=w: (F.linear(x, w), sync())
                                if fmt == "csr" and (device != "cpu" or dtype == torch.float32):
                                    ws = w.to_sparse_csr()  # MKL on CPU, cuSPARSE on CUDA
                                    fns["torch.sparse"] = lambda ws=ws: (torch.sparse.mm(ws, x.t()), sync())
                                if fmt == "2:4" and device != "cpu":
                                    semi = _semi_structured(w, x)  # cuSPARSELt / CUTLASS where supported
                                    if semi is not None:
                                        fns["torch 2:4"] = lambda semi=semi: (F.linear(x, semi), sync())
                            t = time_interleaved(fns, rounds)
                            row = {"op": op, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "out": out,
                                   "in": in_, "density": round(density, 4),
                                   "method": "dense" if t["dense"] < t["sparse"] else "sparse",
                                   "ms": {k: round(v * 1e3, 4) for k, v in t.items()}}
                            rows.append(row)
                            log(json.dumps(row))
    return rows


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
    rows = measure(a.device, dtypes, shapes, tokens, densities, a.rounds or (20 if cuda else 5),
                   log=lambda s: print(s, flush=True))
    info = machine_info()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
    table = {"device_class": "cuda" if cuda else "cpu", "machine": info, "seconds": round(time.perf_counter() - t0),
             "rule": "per call: the method of the nearest row (same op and dtype; distance in log2 tokens, "
                     "log2 out*in, log2 density)", "rows": rows}
    path = a.out or os.path.join(TABLE_DIR, f"{table['device_class']}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(table, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}: {len(rows)} rows in {table['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
