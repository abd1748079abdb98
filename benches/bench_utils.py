"""Helpers shared by the benchmark suites and benches/report.py."""
from __future__ import annotations

import os

import torch

# One timing loop for the benchmarks and `sparse-t5 tune` (its docstring says why it alternates).
from sparse_t5.tune import time_interleaved  # noqa: F401


def machine_info() -> dict:
    """The machine the figures were measured on."""
    from sparse_t5 import cpu_isa
    from sparse_t5.kernel_policy import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "kernel_isa": cpu_isa()}


def make_runner(fwd, dy: torch.Tensor, backward: bool):
    """The callable a benchmark times: fwd() under no_grad, or fwd() then backward with dy."""
    if not backward:
        def run():
            with torch.no_grad():
                return fwd()
        return run
    return lambda: fwd().backward(dy)
