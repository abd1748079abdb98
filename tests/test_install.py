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


def _install_is_current():
    import importlib.util

    spec = importlib.util.spec_from_file_location("install_is_current", os.path.join(ROOT, "scripts", "install_is_current.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_skips_the_install_only_when_it_would_change_nothing(tmp_path, monkeypatch):
    """scripts/setup.sh skips `pip install -e .` (a minute of compiling) when install_is_current.py
    says nothing would change. Here, right after setup.sh installed this checkout, it is current;
    a build input newer than the extension, or an unmet requirement, makes it install."""
    mod = _install_is_current()
    assert mod.main("test") == 0
    newer = tmp_path / "newer.cpp"
    newer.write_text("// edited after the build")
    os.utime(newer, (2**31 - 1, 2**31 - 1))
    monkeypatch.setattr(mod, "BUILD_INPUTS", mod.BUILD_INPUTS + [str(newer)])
    assert mod.main("test") == 1
    monkeypatch.undo()

    class Dist:
        def __init__(self, requires):
            self.requires = requires

    real = mod.md.distribution  # md.version looks distributions up through it too
    for requires, met in ((["torch>=2"], True), (["torch>=999"], False), (["surely-not-installed-pkg"], False),
                          (['surely-not-installed-pkg; extra == "other"'], True),
                          (['surely-not-installed-pkg; extra == "dsi"'], False)):
        monkeypatch.setattr(mod.md, "distribution",
                            lambda name, r=requires, real=real: Dist(r) if name == "sparse-t5" else real(name))
        assert mod.requirements_met("sparse-t5", {"dsi"}, set()) == met, requires


def test_constraints_pin_what_make_test_installs(tmp_path):
    """constraints.txt pins the tested versions (transformers among them); setup.sh reinstalls when
    an installed package is off its pin."""
    import importlib.metadata as md

    mod = _install_is_current()
    pins = dict(line.split("#")[0].strip().split("==") for line in open(os.path.join(ROOT, "constraints.txt"))
                if "==" in line.split("#")[0])
    assert {"transformers", "tokenizers", "triton", "pyserini"} <= set(pins)
    from sparse_t5.hf_compat import TESTED_TRANSFORMERS
    assert pins["transformers"] == TESTED_TRANSFORMERS[1]  # make test runs the newest tested release
    assert mod.constraints_met()
    off = tmp_path / "constraints.txt"
    off.write_text(f"# a comment\ntransformers=={md.version('transformers')}.post999\nsurely-not-installed-pkg==1.0\n")
    assert not mod.constraints_met(str(off))
    off.write_text(f"transformers=={md.version('transformers')}\nsurely-not-installed-pkg==1.0\n")
    assert mod.constraints_met(str(off))
