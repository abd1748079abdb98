"""The one command that measures and publishes the results:

    python benches/report.py            # runs the suites, then regenerates the README and plot
    python benches/report.py --no-run   # regenerates from benches/results/*.json only
    python benches/report.py --suites prune_at_load   # reruns one suite (recovery, kernels,
                                                      # prune_at_load), the rest from the JSON

It runs the recovery suite (test_bench_recovery.py) and the kernel suites with pytest-benchmark,
writes benches/results/recovery.json (and the kernel JSONs), rewrites the README's Results section
between its markers, and draws benches/results/recovery.png (peak memory and step time against
sparsity for dense, mask pruning and ours). Figures are measured on the machine that runs it,
which the README states with them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

from bench_utils import machine_info

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
BEGIN, END = "<!-- results:begin (benches/report.py) -->", "<!-- results:end -->"


SUITES = ("recovery", "scope", "kernels", "prune_at_load", "fsdp", "big_models", "lowbit")
# big_models is opt-in: it writes ~60 GB; lowbit (benches/lowbit_recovery.py) too: 30 min of 200-step curves
DEFAULT_SUITES = ("recovery", "scope", "kernels", "prune_at_load", "fsdp")
# The scope suite: the recovery suite's t5-base CSR rows at both pruning scopes, 3 process pairs each.
SCOPE_SUITE_ENV = {"SPARSE_T5_RECOVERY_SHAPES": "t5-base", "SPARSE_T5_RECOVERY_VARIANTS": "csr:0.2,csr:0.5,csr:0.9",
                   "SPARSE_T5_RECOVERY_SCOPES": "layer,global", "SPARSE_T5_RECOVERY_ROUNDS": "3"}


def run_pytest_benchmark(suite: str, name: str, env: dict | None = None, merge_key=None, select: str | None = None):
    """Run one pytest-benchmark suite; keep each test's extra_info in benches/results/<name>.json.
    With merge_key (row -> key), rows of that file the run did not produce (`select`: pytest -k) stay."""
    raw = os.path.join(RESULTS, f"latest-{name}-benchmark.json")
    subprocess.run([sys.executable, "-m", "pytest", os.path.join(HERE, suite), "-q", "-p", "no:cacheprovider",
                    f"--benchmark-json={raw}", *(["-k", select] if select else [])],
                   check=True, cwd=ROOT, env={**os.environ, **(env or {})})
    rows = [b["extra_info"] for b in json.load(open(raw))["benchmarks"]]
    path = os.path.join(RESULTS, f"{name}.json")
    if merge_key and os.path.exists(path):  # rows not rerun (pytest -k) stay, in their order
        new = {merge_key(r): r for r in rows}
        old = json.load(open(path))["results"]
        rows = [new.pop(merge_key(r), r) for r in old] + list(new.values())
    with open(path, "w") as f:
        json.dump({"machine": machine_info(), "results": rows}, f, indent=1)


def run_suites(suites=SUITES, select=None):
    os.makedirs(RESULTS, exist_ok=True)
    if "recovery" in suites:
        run_pytest_benchmark("test_bench_recovery.py", "recovery")
    if "scope" in suites:
        run_pytest_benchmark("test_bench_recovery.py", "scope", SCOPE_SUITE_ENV)
    if "prune_at_load" in suites:
        run_pytest_benchmark("test_bench_prune_at_load.py", "prune_at_load")
    if "fsdp" in suites:
        out = subprocess.run([sys.executable, os.path.join(HERE, "fsdp_state.py")], check=True, cwd=ROOT,
                             capture_output=True, text=True).stdout
        with open(os.path.join(RESULTS, "fsdp_state.json"), "w") as f:
            json.dump({"machine": machine_info(), "results": [json.loads(out)]}, f, indent=1)
    if "big_models" in suites:  # asking for the suite by name is the opt-in
        # An hour or more per row: --select reruns some (pytest -k) and keeps the others' figures.
        run_pytest_benchmark("test_bench_big_models.py", "big_models", {"SPARSE_T5_BIG_MODELS": "1"},
                             merge_key=lambda r: r.get("row") or f"{r['shape']}-{r['variant']}", select=select)
    if "lowbit" in suites:
        script = os.path.join(HERE, "lowbit_recovery.py")
        run = lambda *a: json.loads(subprocess.run([sys.executable, script, *a], check=True, cwd=ROOT,  # noqa: E731
                                                   capture_output=True, text=True).stdout)
        with open(os.path.join(RESULTS, "lowbit_recovery.json"), "w") as f:
            json.dump({"machine": machine_info(), "curves": run(), "optimizer_step": run("--optimizer-only")}, f)
    if "kernels" in suites:
        for suite, name in (("test_bench_csr_linear.py", "csr_linear"),
                            ("test_bench_semi24_linear.py", "semi24_linear")):
            env = dict(os.environ, SPARSE_T5_BENCH_JSON=os.path.join(RESULTS, f"{name}.json"))
            subprocess.run([sys.executable, "-m", "pytest", os.path.join(HERE, suite), "-q", "-p",
                            "no:cacheprovider"], check=True, cwd=ROOT, env=env)


def prune_at_load_table(path: str) -> str:
    """The headline: whole-process peaks when a run starts from a dense checkpoint on disk."""
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    rows = data["results"]
    dense = next((r for r in rows if r["shape"] == "t5-base" and r["variant"] == "hf_dense"), None)
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    names = {"hf_dense": "HF dense training", "load_then_sparsify:csr:0.9": "load dense, sparsify(0.9), recover",
             "prune_at_load:csr:0.9": "prune-at-load 0.9, recover"}
    lines = [f"**Starting from a dense checkpoint** (`benches/test_bench_prune_at_load.py`; {on_machine(data)}): "
             "whole-process peak "
             "RSS of a fresh process that loads the checkpoint from disk, prunes it and runs recovery steps "
             "(batch 8, source 32, target 8, AdamW), against dense t5-base training measured the same way:", "",
             "| shape | run | whole-process peak | vs dense t5-base training | peak while loading | load (dense: build) "
             "time | step time |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("steps", 1) == 0:
            continue
        ratio = f"{r['peak_rss_bytes'] / dense['peak_rss_bytes']:.2f}x" if dense else "-"
        lines.append(f"| {r['shape']} | {names.get(r['variant'], r['variant'])} | {mb(r['peak_rss_bytes'])} | "
                     f"{ratio} | {mb(r['load_peak_rss_bytes'])} | {r['load_seconds']:.0f} s | "
                     f"{r['step_time_median_s'] * 1e3:.0f} ms |")
    for r in rows:
        if r.get("steps", 1) != 0:
            continue
        load = r["load_peak_rss_bytes"] - r["rss_after_import_bytes"]
        bound = r["model_bytes"] + 2 * r["largest_tensor_bytes"]
        lines += ["", f"Prune-at-load alone, {r['shape']} at 0.9: the load raises the peak by {mb(load)} over the "
                      f"process after imports, for a compressed model of {mb(r['model_bytes'])}; the bound "
                      f"(model + 2 x the largest tensor, {mb(r['largest_tensor_bytes'])}) is {mb(bound)} plus a "
                      f"small constant. Loaded in {r['load_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


KINDS = ("self.q", "self.k", "self.v", "self.o", "cross.q", "cross.k", "cross.v", "cross.o", "ff.wi", "ff.wo")


def on_machine(data: dict) -> str:
    """Where a suite's JSON was measured: the suites run in different sessions, on different hosts."""
    m = data.get("machine") or {}
    return f"measured on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"


def densities(r: dict) -> str:
    d = r.get("density_by_kind") or {}
    return " | ".join(f"{d[k]:.3f}" if k in d else "-" for k in KINDS)


def scope_table(path: str) -> str:
    """The same sparsity at layer and at global scope: step time against HF dense, peak, and the
    per-kind densities global scope produced."""
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    rows = [r for r in data["results"] if r["variant"].startswith("csr:")]
    rows.sort(key=lambda r: (float(r["variant"].split(":")[1]), r.get("scope") != "layer"))
    lines = [f"**Pruning scope** (t5-base shape, the recovery setup above; `python benches/report.py --suites scope`; "
             f"{on_machine(data)}): "
             "the step time of each row against HF dense run in alternate processes beside it (median of 3 pairs, "
             "their range in brackets), and the fraction of weights each kind of layer keeps. Layer scope keeps "
             "every layer at 1 - sparsity; global scope on HF's random init keeps few of the q projections (init std "
             "(d_model d_kv)^-0.5, against d_model^-0.5 for k, v, o and wi) and fewer of wo (d_ff^-0.5), so at "
             "the same sparsity it is another model.", "",
             "| sparsity | scope | step time vs HF dense | peak RSS | " + " | ".join(KINDS) + " |",
             "|---|---|---|---|" + "---|" * len(KINDS)]
    for r in rows:
        step_s, _, ratio = step_time_vs_dense(r, None)
        lines.append(f"| {r['variant'].split(':')[1]} | {r.get('scope', 'global')} | {ratio:.2f}x{pair_range(r)} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MB | {densities(r)} |")
    return "\n".join(lines) + "\n"


def fsdp_table(path: str) -> str:
    """Each rank's training state under FSDP2 against one process's, index replicated or sharded."""
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    r = data["results"][0]

    def cell(key):
        v = r.get(key)
        return f"{v['max_rank_ratio_all']:.3f}x ({v['max_rank_ratio_sparse_layers']:.3f}x)" if v else "-"

    return "\n".join([
        f"**FSDP2** (`python benches/fsdp_state.py`: {r['shape']} widths, {r['layers']} + {r['layers']} blocks, "
        f"{r['world']} gloo ranks, one AdamW step; {on_machine(data)}): the largest rank's parameters, gradients, AdamW moments and "
        "index against one process's, between steps (every unit is sharded then; during the step each unit's "
        "gathered parameters come on top); in brackets, the sparse layers' alone.", "",
        "The last column is bf16 with 8-bit AdamW (each rank quantizes its own shards' moments) against one "
        "process in bf16 with 8-bit AdamW.", "",
        "| format | index replicated | index sharded (default) | index sharded, bf16 + 8-bit AdamW |",
        "|---|---|---|---|",
        f"| CSR 0.9 (global) | {cell('csr/replicated')} | {cell('csr/sharded')} | {cell('csr/sharded/bf16-adamw8bit')} |",
        f"| 2:4 | {cell('2:4/replicated')} | {cell('2:4/sharded')} | {cell('2:4/sharded/bf16-adamw8bit')} |"]) + "\n"


def big_models_table(path: str) -> str:
    """t5-3b and t5-11b recovered on this machine, HF dense t5-large beside them, dense t5-3b and
    t5-11b extrapolated from it per parameter, and the projection for one 24 GB GPU."""
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    rows = data["results"]
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    dense = next((r for r in rows if r["variant"] == "hf_dense"), None)
    ours = [r for r in rows if r["variant"] != "hf_dense"]
    lines = [f"**Models dense training cannot fit** (`benches/test_bench_big_models.py`, opt-in; {on_machine(data)}): "
             "each row a fresh "
             "process that prunes a dense checkpoint as it loads it (fp32 on disk; bf16 for the bf16 rows, which "
             "load, train and save in bf16), then recovery steps "
             "(batch 8, source 32, target 8, the same batch each step), then saves the recovered model "
             "compressed and reloads it (identical logits and greedy ids). Peaks are whole-process RSS, the load "
             "included; the load peak is over the process after imports, against its bound (compressed model + "
             "2 x the largest dense tensor).", "",
             "| model | run | precision, optimizer | whole-process peak | load time | load peak (bound) | step time "
             "(optimizer) | loss, first → last step | kept weights | B / kept weight: values + gradient + moments + "
             "index | checkpoint: dense in, compressed out |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def params(r):  # the shape's dense parameter count (rows before other_numel was recorded: fp32, 4 B each)
        other = r.get("other_numel", r["other_params"] // 4)
        return other + (0 if r["variant"] == "hf_dense" else r["sparse_dense_size"])

    def how(r):
        optim = {"adamw": "AdamW", "adamw8bit": "8-bit AdamW", "adamw4bit": "4-bit AdamW"}[r.get("optim", "adamw")]
        rounding = (", fp32 master" if r.get("master_weights") else ", stochastic rounding") \
            if r.get("precision") == "bf16" and r.get("optim", "adamw") != "adamw" else ""
        in_backward = ", updated in backward" if r.get("step_in_backward") else ""
        return f"{r.get('precision', 'fp32')}, {optim}{rounding}{in_backward}"

    def per_kept(r):
        parts = r.get("sparse_bytes_per_nnz_parts")
        if not parts:
            return f"{r['sparse_bytes_per_nnz']:.1f}"
        grads = f"{parts['grads']:.2f}"
        if r.get("step_in_backward"):  # freed as the update consumes it: only one parameter's at a time
            grads = f"0 (one at a time, at most {r['largest_grad_bytes'] / 1e6:.0f} MB)"
        return (f"**{r['sparse_bytes_per_nnz']:.2f}** = {parts['params']:.2f} + {grads} + "
                f"{parts['optimizer']:.2f} + {parts['index']:.2f}")

    def optimizer_time(r):
        t = r.get("optimizer_step_median_s")
        return "inside backward" if t is None else f"{t:.1f} s"

    if dense:
        lines.append(f"| {dense['shape']} ({params(dense) / 1e9:.2f}B) | HF dense training (measured) | {how(dense)} | "
                     f"{gb(dense['peak_rss_bytes'])} | - | - | {dense['step_time_median_s']:.1f} s "
                     f"({dense['optimizer_step_median_s']:.1f} s) | "
                     f"{dense['losses'][0]:.2f} → {dense['losses'][-1]:.2f} | all | - | - |")
    for r in ours:
        flags = " + gradient checkpointing" if r.get("gradient_checkpointing") else ""
        sparsity = r["variant"].rsplit(":", 1)[1]
        load = r["load_peak_rss_bytes"] - r["rss_after_import_bytes"]
        bound = r["model_bytes"] + 2 * r["largest_tensor_bytes"]
        lines.append(f"| {r['shape']} ({params(r) / 1e9:.2f}B) | ours, CSR {sparsity}, {r['scope']} scope{flags} | "
                     f"{how(r)} | **{gb(r['peak_rss_bytes'])}** ({gb(r['peak_rss_after_round_trip_bytes'])} with the "
                     f"round trip's second copy) | {r['load_seconds']:.0f} s | {gb(load)} ({gb(bound)}) | "
                     f"{r['step_time_median_s']:.1f} s ({optimizer_time(r)}) | "
                     f"{r['losses'][0]:.2f} → {r['losses'][-1]:.2f} | "
                     f"{r['sparse_nnz'] / 1e6:.0f}M | {per_kept(r)} | "
                     f"{gb(r.get('dense_checkpoint_bytes', 0))} → {gb(r['round_trip_checkpoint_bytes'])} |")
    if ours:
        lines += ["", "Kept fraction per kind of layer:", "",
                  "| model | sparsity | scope | " + " | ".join(KINDS) + " |", "|---|---|---|" + "---|" * len(KINDS)]
        lines += [f"| {r['shape']} | {r['variant'].rsplit(':', 1)[1]} | {r['scope']} | {densities(r)} |"
                  for r in {(r["shape"], r["variant"], r["scope"]): r for r in ours}.values()]
    if dense and ours:
        per_param = (dense["peak_rss_bytes"] - dense["rss_after_import_bytes"]) / params(dense)
        lines += ["", f"HF dense training of the same shapes, **extrapolated** per parameter from the measured "
                      f"{dense['shape']} row ({per_param:.1f} B per parameter over the process after imports; "
                      "not run, it would exhaust the machine): " + "; ".join(
                          f"{r['shape']} {gb(dense['rss_after_import_bytes'] + per_param * params(r))}"
                          for r in {r["shape"]: r for r in ours}.values())
                  + "."]
        proj = []
        for r in ours:
            state = r["sparse_total"] + r["other_total"]
            grads_optim = r["sparse_grads"] + r["sparse_optimizer"] + r["other_grads"] + r["other_optimizer"]
            activations = max(0, r["peak_rss_bytes"] - r["rss_after_setup_bytes"] - grads_optim)
            total = state + activations
            proj.append(f"{r['shape']} at {r['variant'].rsplit(':', 1)[1]} ({how(r)}): {gb(state)} of training state "
                        f"({r['sparse_bytes_per_nnz']:.1f} B x {r['sparse_nnz'] / 1e6:.0f}M kept weights, plus the "
                        f"dense embeddings and norms with their optimizer state) + {gb(activations)} of activations and "
                        f"workspace as measured here = {gb(total)}, "
                        f"{'within' if total < 24e9 * 0.9 else 'beyond'} a 24 GB card")
        lines += ["", "**Projection** for one 24 GB GPU (computed from the bytes measured above, before the "
                      "CUDA context and allocator fragmentation; not run on a GPU): " + "; ".join(proj) + "."]
    return "\n".join(lines) + "\n"


def lowbit_table(path: str) -> str:
    """Recovery by precision and optimizer at t5-small (benches/lowbit_recovery.py)."""
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    curves, step = data["curves"], data.get("optimizer_step") or {}
    ns = step.get("ns_per_value", {})
    lines = [f"**Precision and optimizer** (`benches/lowbit_recovery.py`, opt-in suite `lowbit`; {on_machine(data)}): "
             f"{curves['shape']} at {curves['sparsity']} (layer scope), {curves['steps']} recovery steps on a "
             "fixed pool of 64 sequences, the same batches for every row, no dropout. Gap: the largest difference "
             "from fp32 AdamW's loss, both smoothed over 10 steps, absolute and relative. The optimizer's time "
             "per kept value is one step over a 4M-value parameter, the rows interleaved in one process.", "",
             "| precision, optimizer | B / kept weight: values + gradient + moments + index | loss at steps 1, "
             "50, 100, 200 | gap to fp32 (relative) | optimizer step per value (x fp32 AdamW) |",
             "|---|---|---|---|---|"]
    for name, v in curves["variants"].items():
        b = v["bytes_per_kept"]
        losses = v["losses"]
        at = [losses[i] for i in (0, 49, 99, len(losses) - 1)]
        t = ns.get(name)
        time_cell = f"{t:.1f} ns ({t / ns['fp32 adamw']:.1f}x)" if t and ns.get("fp32 adamw") else "-"
        lines.append(f"| {name} | **{b['total']:.2f}** = {b['values']:.2f} + {b['gradient']:.2f} + "
                     f"{b['optimizer']:.2f} + {b['index']:.2f} | {' → '.join(f'{x:.3g}' for x in at)} | "
                     f"{v.get('max_smoothed_gap_to_fp32', 0):.3f} ({v.get('max_relative_smoothed_gap_to_fp32', 0):.1%}) "
                     f"| {time_cell} |")
    return "\n".join(lines) + "\n"


def sparsity_of(variant: str) -> float | None:
    if variant.startswith("csr:"):
        return float(variant.split(":")[1])
    if variant == "2:4":
        return 0.5
    if variant == "hf_mask":
        return 0.2
    return 0.0


def label(variant: str) -> str:
    return {"hf_dense": "HF dense", "hf_mask": "HF + prune masks (l1 20%)", "2:4": "ours 2:4"}.get(
        variant, f"ours CSR {variant.split(':')[1]}" if variant.startswith("csr:") else variant)


def step_time_vs_dense(r: dict, dense: dict | None) -> tuple[float, float, float]:
    """(step s, HF dense step s, ratio): from the paired processes where there are some (ours and HF
    dense run alternately), else against the HF dense row (HF dense itself, or older figures)."""
    if "paired_time_ratio_median" in r:
        return r["paired_step_median_s"], r["paired_dense_step_median_s"], r["paired_time_ratio_median"]
    dense_s = dense["step_time_median_s"] if dense else float("nan")
    return r["step_time_median_s"], dense_s, r["step_time_median_s"] / dense_s


def pair_range(r: dict) -> str:
    """' (lo-hi)': the spread of the per-pair ratios, so a reader sees how far one pair can move it."""
    ratios = r.get("paired_time_ratios") or []
    return f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""


def recovery_table(data: dict) -> str:
    rows = data["results"]
    lines = []
    for shape in sorted({r["shape"] for r in rows}, key=lambda s: ("small" not in s, s)):
        rs = [r for r in rows if r["shape"] == shape]
        dense = next((r for r in rs if r["variant"] == "hf_dense"), None)
        lines += [f"**{shape} shape** ({on_machine(data)}; batch 8, source 32, target 8, AdamW; peak RSS of the "
                  "training steps, each "
                  "variant in its own process; step time against HF dense run in alternate processes beside it, the median "
                  "of the pairs' ratios, their range in brackets; benches/test_bench_recovery.py):", "",
                  "| variant | peak RSS | vs dense | step time | HF dense beside it | step time vs dense | "
                  "model state: sparse layers | bytes / nonzero | model state: rest |",
                  "|---|---|---|---|---|---|---|---|---|"]
        breakdown = ["", f"Where the {shape} peak goes (MB): process after imports; weights and index; gradients; "
                         "optimizer state; the rest of the peak (activations saved for backward, kernel workspaces, "
                         "allocator slack):", "",
                     "| variant | process | weights | sparse index | gradients | optimizer | activations + workspace |",
                     "|---|---|---|---|---|---|---|"]
        for r in rs:
            mem_ratio = r["peak_rss_bytes"] / dense["peak_rss_bytes"] if dense else float("nan")
            step_s, dense_s, time_ratio = step_time_vs_dense(r, dense)
            per_nnz = f"{r['sparse_bytes_per_nnz']:.1f}" if r.get("sparse_bytes_per_nnz") else "-"
            sparse_mb = f"{r['sparse_total'] / 2**20:.0f} MB" if r.get("sparse_total") else "-"
            lines.append(f"| {label(r['variant'])} | {r['peak_rss_bytes'] / 2**20:.0f} MB | {mem_ratio:.2f}x | "
                         f"{step_s * 1e3:.0f} ms | {dense_s * 1e3:.0f} ms | {time_ratio:.2f}x{pair_range(r)} | {sparse_mb} | {per_nnz} | "
                         f"{r['other_total'] / 2**20:.0f} MB |")
            weights = r["sparse_params"] + r["other_params"] + r["other_buffers"]
            grads = r["sparse_grads"] + r["other_grads"]
            optim = r["sparse_optimizer"] + r["other_optimizer"]
            rest = r["peak_rss_bytes"] - r["rss_after_import_bytes"] - weights - r["sparse_index"] - grads - optim
            mb = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
            breakdown.append(f"| {label(r['variant'])} | {mb(r['rss_after_import_bytes'])} | {mb(weights)} | "
                             f"{mb(r['sparse_index'])} | {mb(grads)} | {mb(optim)} | {mb(rest)} |")
        lines += breakdown
        lines.append("")
    return "\n".join(lines)


def kernel_table(path: str, title: str) -> str:
    if not os.path.exists(path):
        return ""
    data = json.load(open(path))
    lines = [f"{title.removesuffix('):')}; {on_machine(data)}):", "", "| benchmark | ratios (time of baseline / time of provider) |",
             "|---|---|"]
    limits = any("limit" in r for r in data["results"])
    if limits:
        lines[2:4] = ["| benchmark | ratios (time of baseline / time of provider) | limit (dense time / the bound's) |",
                      "|---|---|---|"]
    natural = lambda r: [float(t) if t.replace(".", "", 1).isdigit() else t  # noqa: E731  "8 tok" before "32 tok"
                         for t in re.split(r"(\d+(?:\.\d+)?)", r["group"])]
    for r in sorted(data["results"], key=natural):
        ratios = ", ".join(f"{k.replace('_vs_', ' vs ')} {v:.2f}x" for k, v in r.items()
                           if "_vs_" in k and k != "limit_vs_dense")
        limit = f" {r['limit']} {r['limit_vs_dense']:.2f}x |" if "limit" in r else (" - |" if limits else "")
        lines.append(f"| {r['group']} | {ratios} |{limit}")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in data["results"]}, key=lambda s: ("small" not in s, s))
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        rs = [r for r in data["results"] if r["shape"] == shape]
        dense = next((r for r in rs if r["variant"] == "hf_dense"), None)
        figures = (lambda r: r["peak_rss_bytes"] / 2**30, "peak RSS (GiB)"), \
                  (lambda r: step_time_vs_dense(r, dense)[2], "step time / HF dense (paired)")
        for row, (value, ylabel) in enumerate(figures):
            ax = axes[row][col]
            mask = next((r for r in rs if r["variant"] == "hf_mask"), None)
            csr = sorted((r for r in rs if r["variant"].startswith("csr:")), key=lambda r: sparsity_of(r["variant"]))
            if dense:
                ax.axhline(value(dense), color="k", ls="--", label="HF dense")
            if mask:
                ax.axhline(value(mask), color="tab:red", ls=":", label="HF + prune masks (any sparsity)")
            if csr:
                ax.plot([sparsity_of(r["variant"]) for r in csr], [value(r) for r in csr], "o-",
                        color="tab:blue", label="ours, CSR")
            for r in rs:
                if r["variant"] == "2:4":
                    ax.plot([0.5], [value(r)], "s", color="tab:green", label="ours, 2:4")
            ax.set_xlabel("sparsity")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{shape}: {ylabel.split(' (')[0]}")
            ax.set_xlim(-0.02, 1.0)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_readme(text: str):
    readme = os.path.join(ROOT, "README.md")
    content = open(readme).read()
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in content:
        start, end = content.index(BEGIN), content.index(END) + len(END)
        content = content[:start] + block + content[end:]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    open(readme, "w").write(content)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="only regenerate from the committed JSON")
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(DEFAULT_SUITES),
                        help="suites to rerun (default: all); the others come from their committed JSON")
    parser.add_argument("--select", default=None,
                        help="big_models only: the rows to rerun, as pytest -k (e.g. 'ul2 or adamw8bit'); the "
                        "other rows keep their figures")
    args = parser.parse_args()
    if not args.no_run:
        run_suites(args.suites, args.select)
    data = json.load(open(os.path.join(RESULTS, "recovery.json")))
    plot(data, os.path.join(RESULTS, "recovery.png"))
    m = data["machine"]
    text = "\n".join([
        "Measured by `python benches/report.py`. The suites run in different sessions, on different hosts: each "
        f"table names its own (the recovery suite's: CPU kernels {m['kernel_isa']}). Raw figures: "
        "`benches/results/*.json`.", "",
        "![peak memory and step time against sparsity](benches/results/recovery.png)", "",
        recovery_table(data),
        scope_table(os.path.join(RESULTS, "scope.json")),
        prune_at_load_table(os.path.join(RESULTS, "prune_at_load.json")),
        big_models_table(os.path.join(RESULTS, "big_models.json")),
        lowbit_table(os.path.join(RESULTS, "lowbit_recovery.json")),
        fsdp_table(os.path.join(RESULTS, "fsdp_state.json")),
        kernel_table(os.path.join(RESULTS, "csr_linear.json"), "**CSR kernels** (fp32; the limit column: the bytes "
                     "limit at up to 32 tokens, the FLOPs limit from 256, as a speed-up over dense):"),
        kernel_table(os.path.join(RESULTS, "semi24_linear.json"), "**2:4 kernels** (fp32; 512 tokens unless a group names its token count):"),
    ])
    update_readme(text)
    print(text)


if __name__ == "__main__":
    main()
