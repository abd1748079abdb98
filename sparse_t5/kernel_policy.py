"""Which exact method runs each sparse op call: the sparse kernels or transient dense.

Every op (`csr_linear`, `csr_linear_backward_input`, `csr_sddmm` and the three 2:4 ops) has two
exact methods (issue 15):

- ``sparse``: the C++ kernels on CPU (csrc/cpu/), the Triton kernels on GPU (triton_kernels/);
- ``dense`` (transient dense): the weight is decompressed for this call only and the vendor GEMM
  runs (MKL/oneDNN through at::mm on CPU, panel by panel; cuBLAS on GPU), then the dense copy is
  freed. Nothing dense is saved for backward: each backward op rebuilds what it needs, so the
  memory held across a step stays values-only, and the transient peak of one call is at most two
  dense copies of the layer: on CPU one ~1 MiB panel per worker thread, and for dX the partial sums
  of the extra threads, at most one dense copy together (csrc/transient_dense.cpp),
  on GPU one dense copy (triton_kernels/transient_dense.py).

The policy, process-wide like ``torch.backends`` flags:

- ``"auto"`` (default): each call takes the method measured fastest for its (device class, op,
  dtype, tokens, out x in, density), the nearest row of the device class's committed table
  ``sparse_t5/kernel_tables/<class>.json`` (written by ``python benches/kernel_methods.py``);
- ``"sparse"`` / ``"dense"``: force one method for every call.

    with sparse_t5.kernel_policy("dense"):
        loss = model(**batch).loss

``SPARSE_T5_KERNEL_POLICY=auto|sparse|dense`` sets it for a process. Every method gives the same
result to the dtype's tolerance (tests/test_kernel_policy.py).
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

from ._extension import _C  # noqa: F401  (the schemas)

POLICIES = ("auto", "sparse", "dense")
TABLE_DIR = os.path.join(os.path.dirname(__file__), "kernel_tables")
OPS = ("csr_linear", "csr_linear_backward_input", "csr_sddmm", "semi24_linear", "semi24_linear_backward_input",
       "semi24_sddmm")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ops = torch.ops.sparse_t5


def get_kernel_policy() -> str:
    return _ops.get_kernel_policy()


def set_kernel_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"kernel policy must be one of {POLICIES}, got {policy!r}")
    _ops.set_kernel_policy(policy)


@contextlib.contextmanager
def kernel_policy(policy: str):
    """Run the block under `policy` ("auto", "sparse" or "dense"), then restore the previous one."""
    previous = get_kernel_policy()
    set_kernel_policy(policy)
    try:
        yield
    finally:
        set_kernel_policy(previous)


def set_csr_few_tokens(tokens: int) -> None:
    """Calls of 1 to `tokens` tokens (at most 8; 0: none) take the CPU CSR forward's gather path
    (csrc/cpu/csr_kernels_impl.h) instead of the tiled kernel. The default is the crossover
    measured with benches/csr_few_tokens.py (README "How the CSR kernels work")."""
    _ops.set_csr_few_tokens(int(tokens))


def get_csr_few_tokens() -> int:
    return _ops.get_csr_few_tokens()


def choose_method(device_class: str, op: str, dtype: torch.dtype, tokens: int, out_features: int, in_features: int,
                  density: float) -> str:
    """"sparse" or "dense": what a call with these figures runs now (the C++ lookup itself)."""
    return _ops.choose_method(device_class, op, dtype, int(tokens), int(out_features), int(in_features),
                              float(density))


def table_rows(table: dict) -> torch.Tensor:
    """A table file's rows as the [rows, 7] float64 tensor the C++ lookup takes."""
    rows = []
    for r in table["rows"]:
        if r["op"] not in OPS or r["dtype"] not in DTYPES or r["method"] not in ("sparse", "dense"):
            raise ValueError(f"malformed kernel table row: {r}")
        rows.append([OPS.index(r["op"]), _scalar_type_code(DTYPES[r["dtype"]]), r["tokens"], r["out"], r["in"], r["density"],
                     1.0 if r["method"] == "dense" else 0.0])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 7)


def _scalar_type_code(dtype: torch.dtype) -> int:
    # c10::ScalarType's integer values (stable since torch 1.x): the C++ side compares them.
    return {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}[dtype]


def load_table(device_class: str, path: str | None = None) -> bool:
    """Install the measured table of `device_class` ("cpu", "cuda"); False if none is committed."""
    path = path or os.path.join(TABLE_DIR, f"{device_class}.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        table = json.load(f)
    _ops.set_method_table(device_class, table_rows(table))
    return True


def _init() -> None:
    for device_class in ("cpu", "cuda"):
        load_table(device_class)
    policy = os.environ.get("SPARSE_T5_KERNEL_POLICY")
    if policy:
        if policy not in POLICIES:
            raise ValueError(f"SPARSE_T5_KERNEL_POLICY must be one of {POLICIES}, got {policy!r}")
        set_kernel_policy(policy)


_init()
