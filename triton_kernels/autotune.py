"""The one way our Triton kernels are autotuned, on a GPU and under Triton's interpreter alike.

Why a wrapper. Triton's autotuner times every config by launching the kernel into the *real*
arguments, several times each. A kernel that accumulates into its output (atomics or
read-modify-write) therefore returns the sum of every benchmark launch on the first call of each
new shape, unless the autotuner is told to zero that output before each launch (`reset_to_zero`) or
to restore it (`restore_value`). That bug shipped once (the CSR dX kernel, Triton issue 4217's
pattern): `reset_to_zero` is now a required argument, so every kernel states what it accumulates into
(an empty list for kernels that only store).

Under the interpreter (TRITON_INTERPRET=1, the CI's only Triton) there is no GPU timer, and a
single config would make the autotuner skip benchmarking altogether, which is how the bug hid. So
the interpreter gets at least two configs per kernel and `interpreter_do_bench`, which launches each
config BENCH_LAUNCHES times into the real arguments, as `triton.testing.do_bench` does on a GPU.
Tests read BENCH_CALLS to prove the autotuner really benchmarked.
"""
from __future__ import annotations

import collections
import os
import time

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BENCH_LAUNCHES = int(os.environ.get("SPARSE_T5_TRITON_BENCH_LAUNCHES", "2"))
# kernel name -> number of configs the autotuner benchmarked (interpreter only)
BENCH_CALLS: collections.Counter = collections.Counter()
# kernel name -> the Autotuner object, so tests can check every kernel's setup
AUTOTUNED: dict = {}


def _interpreter_do_bench_for(name):
    def do_bench(kernel_call, quantiles=None):
        BENCH_CALLS[name] += 1
        start = time.perf_counter()
        for _ in range(BENCH_LAUNCHES):
            kernel_call()
        elapsed = (time.perf_counter() - start) / BENCH_LAUNCHES
        return [elapsed, elapsed, elapsed] if quantiles else elapsed

    return do_bench


def autotune(configs, interpreter_configs, key, reset_to_zero):
    """triton.autotune with our rules: `reset_to_zero` names every output the kernel accumulates
    into (required; [] for store-only kernels); the interpreter tunes over `interpreter_configs`
    (at least two, small, so the benchmark path runs) with a real multi-launch benchmark."""
    if len(interpreter_configs) < 2:
        raise ValueError("give the interpreter at least two configs, or the autotuner never benchmarks")

    def decorate(fn):
        name = fn.__name__
        if INTERPRET:
            tuner = triton.autotune(configs=interpreter_configs, key=key, reset_to_zero=reset_to_zero or None,
                                    do_bench=_interpreter_do_bench_for(name))(fn)
        else:
            tuner = triton.autotune(configs=configs, key=key, reset_to_zero=reset_to_zero or None)(fn)
        tuner.sparse_t5_reset_to_zero = list(reset_to_zero)
        AUTOTUNED[name] = tuner
        return tuner

    return decorate
