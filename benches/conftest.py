"""Shared benchmark plumbing: collect median times per (group, provider) and print speed ratios
measured in this one run (absolute times vary between machines; ratios taken side by side are
what we report). Run: pytest benches/ [-k csr_linear] ; results: benches/results/<suite>.json
"""
import json
import os
from collections import defaultdict

import pytest
from bench_utils import machine_info, time_interleaved

_RESULTS = defaultdict(dict)  # group -> provider -> median seconds
_LIMITS = {}  # group -> (kind, the speed-up over dense that kind of limit allows)


@pytest.fixture
def record(benchmark):
    """record(group, provider, fn): benchmark fn and keep its median for the ratio table."""

    def _record(group, provider, fn, rounds=10, warmup=2):
        benchmark.group = group
        benchmark.extra_info["provider"] = provider
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
        _RESULTS[group][provider] = benchmark.stats.stats.median

    return _record


@pytest.fixture
def record_limit():
    """record_limit(group, kind, speedup): the most a sparse method can gain over dense in this group
    ("bytes": the weight traffic at few tokens, "FLOPs" at many), printed and reported beside the
    measured ratios so each one reads against its ceiling."""

    def _record(group, kind, speedup):
        _LIMITS[group] = (kind, speedup)

    return _record


@pytest.fixture
def record_interleaved(benchmark):
    """record_interleaved(group, {provider: fn}): time the providers alternately, call by call, and
    keep each one's median for the ratio table (bench_utils.time_interleaved says why)."""

    def _record(group, fns, rounds=15, warmup=2):
        medians = {}
        benchmark.group = group
        benchmark.pedantic(lambda: medians.update(time_interleaved(fns, rounds, warmup)), rounds=1, iterations=1)
        benchmark.extra_info.update({f"{p}_median_s": t for p, t in medians.items()})
        _RESULTS[group].update(medians)
        return medians

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("speed ratios (baseline time / provider time; > 1 means faster than the baseline)")
    rows = []
    for group in sorted(_RESULTS):
        times = _RESULTS[group]
        base_name = next((b for b in ("dense", "hf") if b in times), None)
        line = {"group": group, **{f"{p}_ms": t * 1e3 for p, t in times.items()}}
        if base_name:
            line.update({f"{p}_vs_{base_name}": times[base_name] / t for p, t in times.items() if p != base_name})
        if "torch_sparse" in times:
            line.update({f"{p}_vs_torch_sparse": times["torch_sparse"] / t
                         for p, t in times.items() if p not in ("dense", "torch_sparse")})
        if group in _LIMITS:
            line["limit"], line["limit_vs_dense"] = _LIMITS[group]
        rows.append(line)
        ratios = "  ".join(f"{k}={v:.2f}x" for k, v in line.items() if "_vs_" in k and k != "limit_vs_dense")
        if group in _LIMITS:
            ratios += f"  ({line['limit']} limit {line['limit_vs_dense']:.2f}x)"
        tr.write_line(f"{group:<48} {ratios}")
    out = os.environ.get("SPARSE_T5_BENCH_JSON", os.path.join(os.path.dirname(__file__), "results", "latest.json"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine_info(), "results": rows}, f, indent=1)
    tr.write_line(f"wrote {out}")
