"""Helpers shared by the benchmark suites and benches/report.py."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def machine_info() -> dict:
    """The machine the figures were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    from sparse_t5 import cpu_isa

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "kernel_isa": cpu_isa()}


def make_runner(fwd, dy: torch.Tensor, backward: bool):
    """The callable a benchmark times: fwd() under no_grad, or fwd() then backward with dy."""
    if not backward:
        def run():
            with torch.no_grad():
                return fwd()
        return run
    return lambda: fwd().backward(dy)


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
