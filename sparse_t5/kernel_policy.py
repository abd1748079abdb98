"""Which exact method runs each sparse op call: the sparse kernels, transient dense, or MKL.

Every op (`csr_linear`, `csr_linear_backward_input`, `csr_sddmm` and the three 2:4 ops) has two
exact methods (issue 15):

- ``sparse``: the C++ kernels on CPU (csrc/cpu/), the Triton kernels on GPU (triton_kernels/);
- ``dense`` (transient dense): the weight is decompressed for this call only and the vendor GEMM
  runs (MKL/oneDNN through at::mm on CPU, panel by panel; cuBLAS on GPU), then the dense copy is
  freed. Nothing dense is saved for backward: each backward op rebuilds what it needs, so the
  memory held across a step stays values-only, and the transient peak of one call is at most two
  dense copies of the layer: on CPU one ~1 MiB panel per worker thread, and for dX the partial sums
  of the extra threads, at most one dense copy together (csrc/transient_dense.cpp),
  on GPU one dense copy (triton_kernels/transient_dense.py);
- ``mkl``, a third method of the CPU CSR forward in fp32/fp64 only: torch's sparse CSR product
  (MKL's CSR GEMM) on a CSR tensor viewing the values (csrc/csr_linear.cpp). Issue 32 measured it
  ahead at 1 token on an Intel Xeon, before the few-token path; on this project's AMD EPYC it never
  won (README "Exact methods per op"), so only a table measured where it wins chooses it;
- ``sparse_narrow``, a fourth method of the CPU CSR forward: the sparse kernels with a token tile
  of at most 2 vectors (32 fp32 tokens) where the tile rule (csrc/op_common.h) gives 4. On an AMD
  EPYC it took 0.77-0.94x of the wide tile's time at 768x3072, density 0.5 and 512-2048 tokens, and
  1.02-1.34x at fewer tokens or density 0.8; the Intel Xeon kept the wide tile at in_features 3072.
  Only a table measured on the machine (`sparse-t5 tune`) chooses it.

The policy, process-wide like ``torch.backends`` flags:

- ``"auto"`` (default): each call takes the method measured fastest for its (device class, op,
  dtype, tokens, out, in, density), the nearest row of the device class's table (log2 distance;
  out and in are two axes, so a layer and its transpose take their own rows);
- ``"sparse"`` / ``"dense"``: force one method for every call;
- ``"mkl"``: MKL for every CPU CSR forward in fp32/fp64, sparse for every other call;
- ``"sparse_narrow"``: the narrow tile for every CPU CSR forward, sparse for every other call.

A CPU table also names the CSR few-token kernel (``set_csr_few_tokens_kernel``: "scalar" or
"gather"), which ``sparse-t5 tune`` measures at 1 to ``get_csr_few_tokens()`` tokens; a table
without one (the committed table) takes "scalar".

Which table (``table_info()`` says, and the ``sparse_t5`` logger once at import): on CPU, the table
``sparse-t5 tune`` measured on this machine, when the user cache holds one for this machine's key
(CPU model, kernel ISA, torch's thread count, torch version); otherwise the committed table
``sparse_t5/kernel_tables/<class>.json`` (written by ``python benches/kernel_methods.py`` on the
machine it names). A tuned table that lacks an op and dtype takes the committed rows for them. A
tuned table that cannot be read, or that names another machine, is refused with a warning naming
the file, and the committed table is used: a bad cache never stops an import. After
``torch.set_num_threads``, call ``select_table()`` to pick the table for the new thread count.

    with sparse_t5.kernel_policy("dense"):
        loss = model(**batch).loss

``SPARSE_T5_KERNEL_POLICY=auto|sparse|dense|mkl`` sets it for a process. Every method gives the same
result to the dtype's tolerance (tests/test_kernel_policy.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import warnings

import torch

from ._extension import _C  # noqa: F401  (the schemas)
from .user_cache import cache_dir

log = logging.getLogger("sparse_t5")

POLICIES = ("auto", "sparse", "dense", "mkl", "sparse_narrow")
METHODS = ("sparse", "dense", "mkl", "sparse_narrow")  # a table row's method (the C++ code is its index)
CSR_FORWARD_ONLY = ("mkl", "sparse_narrow")  # methods of the CPU CSR forward only
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
    """Calls of 1 to `tokens` tokens (at most 8; 0: none) take the CPU CSR forward's few-token path
    (csrc/cpu/csr_kernels_impl.h) instead of the tiled kernel. The default is the crossover
    measured with benches/csr_few_tokens.py (README "How the CSR kernels work")."""
    _ops.set_csr_few_tokens(int(tokens))


def get_csr_few_tokens() -> int:
    return _ops.get_csr_few_tokens()


CSR_FEW_TOKENS_KERNELS = ("scalar", "gather")


def set_csr_few_tokens_kernel(kernel: str) -> None:
    """Which kernel serves the few-token path: "scalar" (a row walk, four nonzeros a load, x fetched
    with scalar loads; the default) or "gather" (AVX-512 hardware gathers; elsewhere the scalar walk
    runs). Which is faster depends on the CPU (csrc/cpu/csr_kernels_impl.h): `sparse-t5 tune`
    measures it and the tuned table sets it."""
    _ops.set_csr_few_tokens_kernel(str(kernel))


def get_csr_few_tokens_kernel() -> str:
    return _ops.get_csr_few_tokens_kernel()


def choose_method(device_class: str, op: str, dtype: torch.dtype, tokens: int, out_features: int, in_features: int,
                  density: float) -> str:
    """"sparse" or "dense": what a call with these figures runs now (the C++ lookup itself)."""
    return _ops.choose_method(device_class, op, dtype, int(tokens), int(out_features), int(in_features),
                              float(density))


def table_rows(table: dict) -> torch.Tensor:
    """A table file's rows as the [rows, 7] float64 tensor the C++ lookup takes."""
    rows = []
    for r in table["rows"]:
        if (r["op"] not in OPS or r["dtype"] not in DTYPES or r["method"] not in METHODS
                or (r["method"] in CSR_FORWARD_ONLY and r["op"] != "csr_linear")):
            raise ValueError(f"malformed kernel table row: {r}")
        rows.append([OPS.index(r["op"]), _scalar_type_code(DTYPES[r["dtype"]]), r["tokens"], r["out"], r["in"], r["density"],
                     float(METHODS.index(r["method"]))])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 7)


def _scalar_type_code(dtype: torch.dtype) -> int:
    # c10::ScalarType's integer values (stable since torch 1.x): the C++ side compares them.
    return {torch.float16: 5, torch.float32: 6, torch.float64: 7, torch.bfloat16: 15}[dtype]


class KernelTableError(ValueError):
    """A method table file that cannot be used: unreadable, malformed, or measured on another machine."""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's "model name"; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> dict:
    """What a CPU table's timings depend on, and so what a tuned table is keyed by."""
    from .ops import cpu_isa

    return {"cpu": cpu_model(), "kernel_isa": cpu_isa(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def tuned_table_path(key: dict | None = None) -> str:
    """Where `sparse-t5 tune` keeps the CPU table of the machine `key` (default: this one)."""
    key = key or machine_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "kernel_tables", f"cpu-{digest}.json")


def read_table(path: str, key: dict | None = None) -> dict:
    """A table file, checked: its rows (as the C++ lookup takes them) must parse, and when `key` is
    given the table must have been tuned on that machine. Raises KernelTableError naming the file."""
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not isinstance(table.get("rows"), list) or not table["rows"]:
            raise ValueError("no rows")
        table_rows(table)
        if table.get("csr_few_tokens_kernel", "scalar") not in CSR_FEW_TOKENS_KERNELS:
            raise ValueError(f"csr_few_tokens_kernel {table['csr_few_tokens_kernel']!r} is not one of "
                             f"{', '.join(CSR_FEW_TOKENS_KERNELS)}")
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise KernelTableError(f"kernel method table {path} is not a table sparse-t5 wrote ({err}); delete it "
                               "and run `sparse-t5 tune` again") from err
    if key is not None and table.get("key") != key:
        raise KernelTableError(f"kernel method table {path} was tuned on another machine ({table.get('key')}), "
                               f"not this one ({key}); run `sparse-t5 tune` here")
    return table


_TABLE_INFO: dict[str, dict] = {}


def select_table(device_class: str = "cpu", committed: str | None = None) -> dict:
    """Install the table calls on `device_class` use (see the module docstring for which), and
    return what table_info() says about it."""
    committed = committed or os.path.join(TABLE_DIR, f"{device_class}.json")
    base = read_table(committed) if os.path.isfile(committed) else None
    info = {"device_class": device_class, "source": "none", "path": None, "measured_on": None, "rows": 0,
            "completed_from_committed": []}
    tuned = None
    if device_class == "cpu":
        key = machine_key()
        path = tuned_table_path(key)
        info["key"] = key
        if os.path.isfile(path):
            try:
                tuned = read_table(path, key)
            except KernelTableError as err:
                warnings.warn(f"{err}; using the committed table", UserWarning, stacklevel=2)
                info["refused"] = str(err)
    if tuned is not None:
        covered = {(r["op"], r["dtype"]) for r in tuned["rows"]}
        extra = [r for r in (base or {"rows": []})["rows"] if (r["op"], r["dtype"]) not in covered]
        rows = tuned["rows"] + extra
        info.update(source="tuned", path=path, measured_on=tuned.get("machine"),
                    completed_from_committed=sorted({f"{r['op']}/{r['dtype']}" for r in extra}))
    elif base is not None:
        rows = base["rows"]
        info.update(source="committed", path=committed, measured_on=base.get("machine"))
    else:
        rows = []
    info["rows"] = len(rows)
    _ops.set_method_table(device_class, table_rows({"rows": rows}))
    if device_class == "cpu":  # the few-token kernel this machine measured faster (a committed table: scalar)
        info["csr_few_tokens_kernel"] = (tuned or base or {}).get("csr_few_tokens_kernel", "scalar")
        set_csr_few_tokens_kernel(info["csr_few_tokens_kernel"])
    _TABLE_INFO[device_class] = info
    if device_class == "cpu" or info["source"] != "none":
        where = {"tuned": "tuned on this machine", "committed": "committed, measured on "
                 f"{(info['measured_on'] or {}).get('cpu', 'another machine')}", "none": "none: every call runs sparse"}
        log.info("sparse_t5 kernel policy: %s method table %s (%s, %d rows)%s", device_class, where[info["source"]],
                 info["path"], info["rows"], "" if info["source"] == "tuned" else "; `sparse-t5 tune` measures one here")
    return info


def table_info(device_class: str = "cpu") -> dict:
    """Which method table `device_class`'s calls use: source ("tuned", "committed" or "none"), its
    path, the machine it was measured on, its row count, and the op/dtype pairs a tuned table took
    from the committed one."""
    return dict(_TABLE_INFO.get(device_class) or select_table(device_class))


def load_table(device_class: str, path: str) -> dict:
    """Install the table file at `path` for `device_class`, whatever machine it names (a benchmark
    or a test pinning one table; select_table() goes back to the automatic choice). Returns what
    table_info() then says. Raises KernelTableError if the file is not a table."""
    table = read_table(path)
    _ops.set_method_table(device_class, table_rows(table))
    _TABLE_INFO[device_class] = {"device_class": device_class, "source": "file", "path": path,
                                 "measured_on": table.get("machine"), "rows": len(table["rows"]),
                                 "completed_from_committed": []}
    if device_class == "cpu":
        _TABLE_INFO[device_class]["csr_few_tokens_kernel"] = table.get("csr_few_tokens_kernel", "scalar")
        set_csr_few_tokens_kernel(_TABLE_INFO[device_class]["csr_few_tokens_kernel"])
    return dict(_TABLE_INFO[device_class])


def _init() -> None:
    for device_class in ("cpu", "cuda"):
        try:
            select_table(device_class)
        except KernelTableError as err:  # a broken committed table: say so, run with the built-in fallback
            warnings.warn(str(err), UserWarning, stacklevel=2)
    policy = os.environ.get("SPARSE_T5_KERNEL_POLICY")
    if policy:
        if policy not in POLICIES:
            raise ValueError(f"SPARSE_T5_KERNEL_POLICY must be one of {POLICIES}, got {policy!r}")
        set_kernel_policy(policy)


_init()
