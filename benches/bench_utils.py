"""Helpers shared by the benchmark suites and benches/report.py."""
from __future__ import annotations

import os
import platform

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
