"""Builds sparse_t5._C, the C++ CPU kernels registered under torch.ops.sparse_t5.

Install (torch must already be installed, so the extension builds against it):
    pip install --no-build-isolation -e .
DEBUG=1 builds with -O0 -g. The default build has no -march flag: AVX2 and AVX-512 variants are
compiled per file with `#pragma GCC target` and chosen at run time (csrc/cpu/dispatch.cpp).
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

DEBUG = os.environ.get("DEBUG", "0") == "1"

cxx_flags = ["-std=c++17", "-Wall", "-Wextra", "-Wno-unused-parameter"]
cxx_flags += ["-O0", "-g"] if DEBUG else ["-O3"]
# at::parallel_for is an OpenMP region compiled into this library; the GOMP symbols resolve to
# the libgomp torch ships (already loaded with libtorch_cpu), so no second OpenMP runtime.
cxx_flags += ["-fopenmp"]

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))

setup(
    packages=[
        "sparse_t5",
        "sparse_t5.ops",
        "sparse_t5.dsi",
        "sparse_t5_triton",
    ],
    # Triton publishes its own top-level `triton_kernels` package; ours installs as
    # `sparse_t5_triton` so both can be installed side by side.
    package_dir={"sparse_t5_triton": "triton_kernels"},
    ext_modules=[
        CppExtension(
            "sparse_t5._C",
            sources=sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
