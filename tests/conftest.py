import os
import shutil
import tempfile

import pytest
import torch

# The suite never reads the user's cache (~/.cache/sparse-t5 or $SPARSE_T5_CACHE): a method table that
# `sparse-t5 tune` wrote there changes which kernel method each call runs, so what the tests check would
# depend on the machine's history (a table tuned on this Intel host failed CI at cf40b82, where a clean
# machine passed). Every test process, and the worker processes they start, gets one empty cache for
# the session instead: the committed table (sparse_t5/kernel_tables), and the offline encoder extracted
# afresh. Set before any test module imports sparse_t5, whose import installs the table.
_SESSION_CACHE = tempfile.mkdtemp(prefix="sparse-t5-test-cache-")
os.environ["SPARSE_T5_CACHE"] = _SESSION_CACHE

# Under the Triton test entry point (tests/test_triton_kernels.py runs these op-level tests in a
# child process with TRITON_INTERPRET=1 SPARSE_T5_TRITON_ON_CPU=1), bf16 cannot run: Triton's
# interpreter has no bf16 arithmetic.
TRITON_ON_CPU = os.environ.get("SPARSE_T5_TRITON_ON_CPU") == "1"


def skip_dtype_under_triton_interpreter(dtype):
    import pytest

    if TRITON_ON_CPU and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is not supported by Triton's interpreter: checked on a CUDA GPU only")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
    if TRITON_ON_CPU and exitstatus == 0:
        from sparse_t5_triton.csr_linear import CALLS

        if sum(CALLS.values()) == 0:
            print("\nSPARSE_T5_TRITON_ON_CPU=1 but no op went through the Triton kernels")
            session.exitstatus = 1
        else:
            print(f"\nTriton launches: {dict(CALLS)}")


def pytest_generate_tests(metafunc):
    # kernel_method's values: the module's KERNEL_METHODS, default the two every op has; the CSR
    # suites add "mkl", the third method of the CPU CSR forward.
    if "kernel_method" in metafunc.fixturenames:
        methods = getattr(metafunc.module, "KERNEL_METHODS", ("sparse", "dense"))
        if TRITON_ON_CPU:  # the Triton bodies have neither CPU-only method: they would rerun as "sparse"
            methods = tuple(m for m in methods if m not in ("mkl", "sparse_narrow"))
        metafunc.parametrize("kernel_method", methods, indirect=True)


@pytest.fixture
def kernel_method(request):
    """Runs a test under each exact method of the ops (sparse_t5.kernel_policy): the op-level
    suites use it for every test, so every method meets the same reference."""
    from sparse_t5 import kernel_policy

    with kernel_policy(request.param):
        yield request.param
