"""Measure the exact methods of every sparse op on this machine: the kernel-method tables.

    sparse-t5 tune                         # t5-base's layer shapes, into the user cache
    sparse-t5 tune --model path/or/name    # that model's own layer shapes (its config only)
    sparse-t5 tune --show                  # which table the auto policy uses now, and why

For each (op, dtype, tokens, out x in, density) the methods of sparse_t5.kernel_policy (the
sparse kernels, transient dense, and for the CPU CSR forward MKL in fp32/fp64 and the narrow token
tile where its tile differs from the rule's) run alternately on
the same inputs (time_interleaved) and the fastest becomes the table's row; each row keeps the medians, so the table says by how much each
method won. `tune()` writes the CPU table to the user cache under this machine's key (CPU model,
kernel ISA, torch threads, torch version: kernel_policy.machine_key) and installs it, so the auto
policy uses it from then on, in this process and the next ones on this machine.
benches/kernel_methods.py writes the committed fallback table (sparse_t5/kernel_tables/) with the
same measure(), plus the reference columns (dense F.linear, torch.sparse).

The cost is bounded by the grid: t5-base's 3 shapes x 5 formats (4 CSR densities + 2:4) x 10 token
counts x 3 ops, 5 timed rounds each, took 20 s on 2 cores (README "Kernel methods on your machine").
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from .kernel_policy import (get_csr_few_tokens, get_csr_few_tokens_kernel, kernel_policy, load_table, machine_key,
                            select_table, set_csr_few_tokens_kernel, tuned_table_path)
from .checkpoint import atomic_write
from .layers import SparseLinear

ops = torch.ops.sparse_t5

# (out, in) of the Linear layers of T5 checkpoints: FFN wi / wo and attention projections.
SHAPES = {
    "t5-small": [(2048, 512), (512, 2048), (512, 512)],
    "t5-base": [(3072, 768), (768, 3072), (768, 768)],
    "t5-large": [(4096, 1024), (1024, 4096), (1024, 1024)],
    "t5-xl": [(5120, 2048), (2048, 5120), (2048, 2048)],
}
CSR_DENSITIES = (0.1, 0.2, 0.5, 0.8)
# Decode (1), small batches and the few-token path's range, training batches (256, 512): every
# power of two, since the nearest-row rule picked the slower method between 32 and 256 tokens
# when the grid skipped 64 and 128 (benches/auto_policy.py). And 3, the CSR forward's few-token
# crossover (kDefaultCsrFewTokens, csrc/kernel_policy.cpp): the forward switches kernels between
# 3 and 4 tokens, so a 3-token call must not take the 4-token row's verdict, which times the tiled
# kernel (it took dense at density 0.7, 1.36-1.52x the few-token path's time, in 2 of 3 runs).
TUNE_TOKENS = (1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512)
# How csrc/kernel_policy.cpp looks a call up in a table; written into every table (tune's and
# benches/kernel_methods.py's committed one).
TABLE_RULE = ("per call: the method of the nearest row (same op and dtype; distance in log2 tokens, log2 out, "
              "log2 in, log2 density)")


def time_interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Median seconds per callable, timed alternately (a, b, c, a, b, c, ...) in one process.

    On a shared machine whose speed drifts over seconds (neighbours' load), timing one provider
    after another skews a ratio by whatever the drift did in between; alternating call by call
    makes every provider see the same conditions."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def model_shapes(config) -> list[tuple[int, int]]:
    """The distinct (out, in) of a T5 config's sparse layers: the FFN's wi (wi_0, wi_1) and wo, and
    the attention projections (q, k, v: inner x d_model; o: d_model x inner)."""
    inner = config.num_heads * config.d_kv
    shapes = [(config.d_ff, config.d_model), (config.d_model, config.d_ff), (inner, config.d_model),
              (config.d_model, inner)]
    return list(dict.fromkeys(shapes))


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


def _forced(policy: str, fn, sync):
    def run():
        with kernel_policy(policy):
            fn()
        sync()
    return run


def _references(fmt, sl, lin, x, dtype, device, sync) -> dict:
    """What the forward is compared with, timed in the same rounds: dense F.linear on the masked
    weight (what the sparse layer replaces), torch.sparse (MKL on CPU, cuSPARSE on CUDA) for CSR,
    torch's semi-structured 2:4 on a GPU that has it."""
    fns = {}
    w = lin.weight.detach() * sl.mask().to(dtype)
    fns["F.linear"] = lambda: (F.linear(x, w), sync())
    if fmt == "csr" and (device != "cpu" or dtype == torch.float32):
        ws = w.to_sparse_csr()
        fns["torch.sparse"] = lambda: (torch.sparse.mm(ws, x.t()), sync())
    if fmt == "2:4" and device != "cpu":
        semi = _semi_structured(w, x)
        if semi is not None:
            fns["torch 2:4"] = lambda: (F.linear(x, semi), sync())
    return fns


def _narrow_differs(tokens: int, dtype, sl) -> bool:
    """Whether "sparse_narrow" runs another tile than "sparse" for this CPU CSR forward call (where
    it does not, it is the same kernel, and timing it twice would only let noise choose)."""
    if tokens <= ops.get_csr_few_tokens():
        return False  # the few-token path, which has no tile
    a = (tokens, dtype, sl.nnz, sl.out_features, sl.in_features)
    return ops.csr_forward_tiling(*a, "sparse") != ops.csr_forward_tiling(*a, "sparse_narrow")


def measure(device: str, dtypes, shapes, tokens_list, densities, rounds: int, references: bool = False,
            log=None) -> list[dict]:
    """One table row per (dtype, shape, format and density, tokens, op): both methods' medians and
    the faster. references=True also times the forward's references (benches/kernel_methods.py)."""
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
                            methods = ["sparse", "dense"]
                            if op == "csr_linear" and device == "cpu" and dtype in (torch.float32, torch.float64):
                                methods.append("mkl")
                            if op == "csr_linear" and device == "cpu" and _narrow_differs(tokens, dtype, sl):
                                methods.append("sparse_narrow")
                            fns = {m: _forced(m, fn, sync) for m in methods}
                            if references and op.endswith("_linear"):
                                fns.update(_references(fmt, sl, lin, x, dtype, device, sync))
                            ms = {k: round(v * 1e3, 4) for k, v in time_interleaved(fns, rounds).items()}
                            # Chosen from the medians as recorded, so that a row's method is always the
                            # fastest of its own ms (two medians within 0.1 us round to a tie, which the
                            # first method in `methods` takes).
                            row = {"op": op, "dtype": str(dtype).replace("torch.", ""), "tokens": tokens, "out": out,
                                   "in": in_, "density": round(density, 4), "method": min(methods, key=ms.get),
                                   "ms": ms}
                            rows.append(row)
                            if log:
                                log(json.dumps(row))
    return rows


def measure_few_tokens_kernel(shapes, densities, rounds: int = 20) -> dict:
    """Which CSR few-token kernel ("scalar" or "gather") serves decoding faster here: both run
    alternately on every shape and density at 1 to get_csr_few_tokens() tokens (fp32, the sparse
    method), and the kernel with the smaller sum of medians wins (a decode step's sparse time is
    the sum over its layers). Which wins is the CPU's (csrc/cpu/csr_kernels_impl.h), so one pick
    serves every shape. Without a 16-lane gather (an ISA but AVX-512) the answer is "scalar"."""
    from .ops import cpu_isa

    if cpu_isa() != "avx512" or get_csr_few_tokens() == 0:
        return {"kernel": "scalar", "ms": {}}
    previous = get_csr_few_tokens_kernel()
    totals = {"scalar": 0.0, "gather": 0.0}
    torch.manual_seed(0)
    try:
        with kernel_policy("sparse"), torch.no_grad():
            for out, in_ in shapes:
                for density in densities:
                    sl, _ = layer("csr", out, in_, density, torch.float32, "cpu")
                    for tokens in range(1, get_csr_few_tokens() + 1):
                        x = torch.randn(tokens, in_)
                        a = (x, sl.values, sl.row_ptr, sl.col_idx, sl.out_features, sl.in_features)

                        def run(kernel, a=a):
                            set_csr_few_tokens_kernel(kernel)
                            ops.csr_linear(*a)

                        t = time_interleaved({k: (lambda k=k: run(k)) for k in totals}, rounds)
                        for k in totals:
                            totals[k] += t[k]
    finally:
        set_csr_few_tokens_kernel(previous)
    ms = {k: round(v * 1e3, 4) for k, v in totals.items()}
    return {"kernel": min(ms, key=ms.get), "ms": ms}  # from the recorded sums, as the method rows above


def write_table(path: str, table: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(table, f, indent=1)

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, write)


def tune(shapes=None, tokens=TUNE_TOKENS, densities=CSR_DENSITIES, dtypes=(torch.float32,), rounds: int = 5,
         path: str | None = None, log=None) -> dict:
    """Measure the CPU methods for `shapes` ((out, in) pairs; default t5-base's, or model_shapes(config)
    for a model's own) at `tokens` and `densities` on this machine, write the table (default: the
    user cache under this machine's key), install it for the auto policy and return table_info()."""
    shapes = list(shapes or SHAPES["t5-base"])
    for d in densities:
        if not 0 < d <= 1:
            raise ValueError(f"densities must be in (0, 1], got {d}")
    if not tokens or any(int(t) < 1 for t in tokens):
        raise ValueError(f"token counts must be >= 1, got {tokens}")
    t0 = time.perf_counter()
    # The few-token kernel first: the rows below then time the sparse method with the one chosen.
    few = measure_few_tokens_kernel(shapes, densities)
    previous = get_csr_few_tokens_kernel()
    set_csr_few_tokens_kernel(few["kernel"])
    try:
        rows = measure("cpu", dtypes, shapes, [int(t) for t in tokens], densities, rounds, log=log)
    finally:
        set_csr_few_tokens_kernel(previous)
    key = machine_key()
    table = {"device_class": "cpu", "key": key, "machine": {**key, "cores": os.cpu_count()},
             "seconds": round(time.perf_counter() - t0, 1), "rule": TABLE_RULE,
             "csr_few_tokens_kernel": few["kernel"], "csr_few_tokens_kernel_ms": few["ms"], "rows": rows}
    default = tuned_table_path(key)
    write_table(path or default, table)
    if path is None or os.path.abspath(path) == os.path.abspath(default):
        info = select_table("cpu")
    else:
        info = load_table("cpu", path)
    return {**info, "seconds": table["seconds"]}


def summary(info: dict) -> str:
    """One paragraph saying which table the auto policy uses and why (`sparse-t5 tune --show`)."""
    measured = info.get("measured_on") or {}
    lines = [f"{info['device_class']} method table: {info['source']} ({info['rows']} rows) {info['path']}",
             f"  measured on: {measured.get('cpu', '?')}, {measured.get('kernel_isa', '?')}, "
             f"{measured.get('torch_threads', '?')} threads, torch {measured.get('torch', '?')}"]
    if "key" in info:
        key = info["key"]
        lines.append(f"  this machine: {key['cpu']}, {key['kernel_isa']}, {key['torch_threads']} threads, "
                     f"torch {key['torch']}")
    if "seconds" in info:
        lines.append(f"  measured now in {info['seconds']} s")
    if info.get("csr_few_tokens_kernel"):
        lines.append(f"  CSR few-token kernel: {info['csr_few_tokens_kernel']}")
    if info.get("completed_from_committed"):
        lines.append("  from the committed table: " + ", ".join(info["completed_from_committed"]))
    if info.get("refused"):
        lines.append(f"  refused: {info['refused']}")
    if info["source"] != "tuned":
        lines.append("  `sparse-t5 tune` measures a table for this machine")
    return "\n".join(lines)
