"""Builds sparse_t5._C, the C++ CPU kernels registered under torch.ops.sparse_t5, against the torch
installed in the target environment.

Install, in an environment that has torch (scripts/setup.sh installs a tested one):
    pip install -e .            (or `pip install .`)
The in-tree build backend (build_backend/sparse_t5_build.py) makes that environment's torch
visible to this file under pip's build isolation, so nothing is downloaded and the extension
matches the torch it runs with. `--no-build-isolation` works too.

torch chooses the C++ standard (cpp_extension passes -std=c++20; torch >= 2.15's headers need it),
so no -std flag is given here. DEBUG=1 builds with -O0 -g. The default build has no -march flag:
AVX2 and AVX-512 variants are compiled per file with `#pragma GCC target` and chosen at run time
(csrc/cpu/dispatch.cpp).

The torch version the extension was compiled against is written beside it
(sparse_t5/_build_info.json); importing sparse_t5 under another torch raises an ImportError that
names both versions (sparse_t5/_extension.py).
"""
import glob
import json
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # without the in-tree backend, e.g. `python setup.py ...` in an env without torch
    raise SystemExit("sparse-t5: torch is not installed; install torch first, then `pip install -e .`") from None

DEBUG = os.environ.get("DEBUG", "0") == "1"
BUILD_INFO = "_build_info.json"

cxx_flags = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
cxx_flags += ["-O0", "-g"] if DEBUG else ["-O3"]
# at::parallel_for is an OpenMP region compiled into this library; the GOMP symbols resolve to
# the libgomp torch ships (already loaded with libtorch_cpu), so no second OpenMP runtime.
cxx_flags += ["-fopenmp"]

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))


class BuildExtensionRecordingTorch(BuildExtension):
    """BuildExtension that writes the torch version it compiled against beside the extension."""

    def run(self):
        super().run()
        for ext in self.extensions:
            target_dir = os.path.dirname(self.get_ext_fullpath(ext.name))
            os.makedirs(target_dir, exist_ok=True)
            with open(os.path.join(target_dir, BUILD_INFO), "w") as f:
                json.dump({"torch": torch.__version__, "debug": DEBUG}, f)


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
    # The measured method tables of the kernel policy (sparse_t5/kernel_policy.py).
    package_data={"sparse_t5": ["kernel_tables/*.json"]},
    ext_modules=[
        CppExtension(
            "sparse_t5._C",
            sources=sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx_flags},
        )
    ],
    cmdclass={"build_ext": BuildExtensionRecordingTorch.with_options(use_ninja=True)},
)
