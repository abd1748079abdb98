"""Exit 0 when `pip install -e .[EXTRA]` would change nothing, so scripts/setup.sh can skip it (the
build recompiles the extension, about a minute of `make demo` / `make test` on 2 cores): sparse_t5
is installed editable from this checkout and imports (which checks the torch it was built against),
its compiled extension is newer than every C++ source and build file, every requirement of the
package and of EXTRA (recursively, e.g. test -> dsi) is installed at an accepted version, and every
installed package that constraints.txt pins is at its pin. Any doubt
exits 1 and the install runs.

    python scripts/install_is_current.py [EXTRA]
"""
from __future__ import annotations

import glob
import importlib.metadata as md
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_INPUTS = ["csrc/**/*", "setup.py", "pyproject.toml", "build_backend/*.py"]


def requirements_met(dist_name: str, extras: set[str], seen: set) -> bool:
    from packaging.requirements import Requirement

    for line in md.distribution(dist_name).requires or []:
        req = Requirement(line)
        wanted = [e for e in extras | {""} if req.marker is None or req.marker.evaluate({"extra": e})]
        if not wanted:
            continue
        key = (req.name.lower(), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            return False
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            return False
        if req.extras and not requirements_met(req.name, set(req.extras), seen):
            return False
    return True


def constraints_met(path: str = os.path.join(ROOT, "constraints.txt")) -> bool:
    """Every installed package that constraints.txt pins is at its pinned version."""
    with open(path) as f:
        for line in f:
            name, sep, pinned = line.split("#")[0].strip().partition("==")
            if not sep:
                continue
            try:
                if md.version(name) != pinned:
                    return False
            except md.PackageNotFoundError:
                pass  # pinned but not needed here: the requirements check decides
    return True


def main(extra: str) -> int:
    try:
        import sparse_t5
        from sparse_t5 import _C
    except Exception:  # noqa: BLE001 - not installed, or built against another torch
        return 1
    if os.path.dirname(os.path.dirname(os.path.abspath(sparse_t5.__file__))) != ROOT:
        return 1  # installed from another checkout
    built = os.path.getmtime(_C.__file__)
    for pattern in BUILD_INPUTS:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            if os.path.isfile(path) and os.path.getmtime(path) > built:
                return 1
    try:
        met = requirements_met("sparse-t5", {extra} if extra else set(), set()) and constraints_met()
        return 0 if met else 1
    except Exception:  # noqa: BLE001 - no packaging, unreadable metadata: install
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
