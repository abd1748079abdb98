"""In-tree PEP 517 build backend: setuptools, compiled against the torch of the target environment.

Why this exists. sparse_t5._C is a C++ extension linked against libtorch, whose C++ ABI changes with
every torch release, so it must be compiled against the very torch it will run with. A plain
`pip install -e .` builds in an isolated environment that does not contain the user's torch; with
`torch` as a build requirement pip would put the newest torch from the index there (a CUDA build of
several GB) and compile against a torch the extension never runs with.

What it does. pip runs this backend with the target environment's own interpreter, hiding that
environment's site-packages. The backend finds torch there (by its installed metadata, without
importing it) and appends those site-packages to the end of sys.path, so setup.py compiles against
the installed torch while the build tools (setuptools, wheel, ninja) still come from the isolated
environment. Nothing is downloaded: measured here on the same tree (torch 2.13.0+cpu, 2 cores), a
plain `pip install -e .` took 35.6 s and `--no-build-isolation` 35.5 s.

Rejected alternatives (README, "Install"): requiring `torch==<installed version>` in the isolated
environment re-installs torch (5 GB for a CUDA build) on every build and cannot find local builds
such as `2.13.0+cpu` on an index that lacks them; the LibTorch stable ABI (STABLE_TORCH_LIBRARY)
would need every binding rewritten against torch/csrc/stable, whose API (parallel_for, dispatch)
is still partial in the supported range.

Where it cannot work it stops within seconds with one line that says what to do: no torch in the
target environment, a torch older than the supported range, or no C++20 compiler.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import build_meta as _setuptools

# The supported torch range (README "Install"); scripts/check_torch_compat.sh builds and tests both ends.
OLDEST_TORCH = (2, 13)


def _fail(message: str):
    raise SystemExit(f"sparse-t5: {message}")


def _target_site_dirs() -> list[str]:
    """site-packages of the environment being installed into (pip's isolation hides them)."""
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"]]
    try:
        dirs.append(site.getusersitepackages())  # torch installed with `pip install --user`
    except AttributeError:
        pass
    return [d for i, d in enumerate(dirs) if d and os.path.isdir(d) and d not in dirs[:i]]


def _torch_version_in(dirs: list[str]) -> str | None:
    for dist in importlib.metadata.distributions(path=dirs):
        if (dist.metadata["Name"] or "").lower() == "torch":
            return dist.version
    return None


def _expose_target_torch() -> str:
    """Make the target environment's torch importable; return its version. Stops with one line if
    there is none (or it is too old)."""
    try:  # --no-build-isolation, or a frontend that put torch in the build environment itself
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        dirs = _target_site_dirs()
        version = _torch_version_in(dirs)
        if version is None:
            _fail(f"no torch in the environment being installed into ({sys.executable}). Install torch first "
                  "(e.g. `pip install torch`, or scripts/setup.sh), then run `pip install -e .` again; with a "
                  "frontend that builds in a separate environment (python -m build, uv) pass --no-build-isolation.")
        for d in dirs:
            if d not in sys.path:
                sys.path.append(d)  # after the build environment's own entries, so its setuptools wins
    major_minor = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if major_minor < OLDEST_TORCH:
        _fail(f"torch {version} is older than the supported range (>= {OLDEST_TORCH[0]}.{OLDEST_TORCH[1]}); "
              "upgrade torch (`pip install -U torch`), then run `pip install -e .` again.")
    return version


def _check_compiler() -> None:
    """One line instead of a compiler log when there is no C++20 compiler (torch's headers need it)."""
    cxx = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx) is None:
        _fail(f"no C++ compiler ('{cxx}' is not on PATH). Install one (Debian/Ubuntu: `apt-get install g++`; "
              "or set CXX), then run `pip install -e .` again.")
    probe = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"], input="#include <concepts>\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        _fail(f"the C++ compiler '{cxx}' cannot compile C++20, which torch's headers need (GCC >= 10 or "
              "Clang >= 12). Install a newer one or point CXX at it, then run `pip install -e .` again.")


def _requires() -> list[str]:
    # torch first: setuptools runs setup.py to collect its own requirements, and setup.py imports torch.
    _expose_target_torch()
    _check_compiler()
    return ["ninja"]


def get_requires_for_build_wheel(config_settings=None):
    ours = _requires()
    return _setuptools.get_requires_for_build_wheel(config_settings) + ours


def get_requires_for_build_editable(config_settings=None):
    ours = _requires()
    return _setuptools.get_requires_for_build_editable(config_settings) + ours


def get_requires_for_build_sdist(config_settings=None):
    return _setuptools.get_requires_for_build_sdist(config_settings)  # an sdist compiles nothing


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    _expose_target_torch()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _expose_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    return _setuptools.build_sdist(sdist_directory, config_settings)
