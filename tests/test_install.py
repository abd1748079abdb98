"""Install and load checks (issue: `pip install -e .` as typed, against the user's torch).

- importing sparse_t5 under another torch than the extension was built against raises an
  ImportError that names both versions and the fix (sparse_t5/_extension.py);
- the in-tree build backend stops within seconds with one line when the target environment has no
  torch, exactly as pip's build isolation would run it (build_backend/sparse_t5_build.py).
The full install, a plain `pip install -e .`, is what `make test` itself does first (scripts/setup.sh);
scripts/check_torch_compat.sh repeats it in fresh environments at both ends of the supported range.
"""
import os
import subprocess
import sys

import pytest
import torch

from sparse_t5._extension import built_with_torch, check_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_extension_records_the_torch_it_was_built_against():
    assert built_with_torch() == torch.__version__


def test_a_torch_mismatch_is_an_import_error_naming_both_versions():
    with pytest.raises(ImportError, match=r"built against torch 2\.13\.0\+cpu, but torch 2\.15\.0 is running.*pip install -e \."):
        check_build("2.13.0+cpu", "2.15.0")
    check_build("2.13.0+cpu", "2.13.0+cpu")
    check_build(None, "2.15.0")  # nothing recorded (e.g. a CMake build): the loader's own error applies


def test_importing_sparse_t5_under_another_torch_fails_cleanly():
    code = "import torch; torch.__version__ = '9.9.9'; import sparse_t5"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: sparse_t5's C++ extension was built against torch " + torch.__version__), last
    assert "torch 9.9.9 is running" in last and "pip install -e ." in last, last


def test_the_build_backend_stops_in_seconds_without_torch(tmp_path):
    """pip runs the backend with the target environment's interpreter and only the build tools on
    sys.path. Reproduce that: a fresh virtual environment with no torch is the target, and a
    directory holding setuptools is the build environment."""
    import setuptools

    target = tmp_path / "target-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=120)
    build_env = tmp_path / "build-env"
    build_env.mkdir()
    site_packages = os.path.dirname(os.path.dirname(setuptools.__file__))
    for name in ("setuptools", "pkg_resources", "_distutils_hack"):
        if os.path.exists(os.path.join(site_packages, name)):
            os.symlink(os.path.join(site_packages, name), build_env / name)
    env = dict(os.environ, PYTHONPATH=f"{build_env}{os.pathsep}{os.path.join(ROOT, 'build_backend')}",
               PYTHONNOUSERSITE="1")
    out = subprocess.run([str(target / "bin" / "python"), "-c",
                          "import sparse_t5_build; sparse_t5_build.get_requires_for_build_editable()"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparse-t5: no torch in the environment being installed into"), out.stderr
    assert "Install torch first" in lines[0]
