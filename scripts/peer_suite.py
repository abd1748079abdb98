#!/usr/bin/env python3
"""HF's own T5 test suite as a peer check of SparseT5ForConditionalGeneration (`make peer`).

For each archive of HF's test tree (../shared/peer, see its README) this:
1. extracts it into a temp dir and links `src/transformers` to the installed package, as HF's
   tests read the library's source through `direct_transformers_import`;
2. makes a fresh virtual environment with the matching transformers and test tools (pins in
   PEER_VERSIONS) and the same torch as this environment, so the extension already built in this
   checkout (scripts/setup.sh) loads there: the checkout is put on PYTHONPATH;
3. runs tests/models/t5/test_modeling_t5.py three ways: the control (HF's class), the swap (one line
   after the file's imports: `from sparse_t5 import SparseT5ForConditionalGeneration as
   T5ForConditionalGeneration`), and the alias (a subclass of ours named T5ForConditionalGeneration,
   which separates tests keyed on the class name - HF's auto-mappings, torch.fx's whitelist - from
   real gaps);
4. compares them test by test (junit XML).

A swap-only difference is a test that passed in the control and failed, errored or skipped in the
swap. Each must be listed, with its reason, in tests/peer/known_differences.json; a "harness"
entry must pass in the alias run (else it is no harness artefact). The run fails on any swap-only
difference not listed there, and on a control failure (the environment is broken, not our class).
Listed entries that no longer differ are reported as stale.

    python scripts/peer_suite.py                   every archive in ../shared/peer
    python scripts/peer_suite.py --versions 4.49.0 one of them
    python scripts/peer_suite.py --library 5.24.0 --versions 5.4.0
                                                   a test tree against another transformers
                                                   (no archive of the newest tree exists here)
Needs the package index (the venv installs) and about 4 minutes per version on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# HF's test-tree archives: ../shared/peer beside the checkout, or wherever SPARSE_T5_PEER_DIR says (a clone
# elsewhere, as CI's may be).
PEER_DIR = os.environ.get("SPARSE_T5_PEER_DIR") or os.path.join(os.path.dirname(ROOT), "shared", "peer")
KNOWN = os.path.join(ROOT, "tests", "peer", "known_differences.json")
T5_TESTS = "tests/models/t5/test_modeling_t5.py"
# What each archive pairs with (../shared/peer/README.md): the test tools its tree needs.
PEER_VERSIONS = {
    "4.49.0": ["pytest==7.4.4", "parameterized==0.9.0", "pytest-timeout==2.3.1", "datasets==3.6.0",
               "sentencepiece", "pytest-xdist==3.6.1"],
    "5.4.0": ["pytest==8.4.2", "parameterized==0.9.0", "pytest-timeout==2.4.0", "datasets==5.2.0",
              "sentencepiece", "pytest-xdist==3.8.0", "httpx"],  # httpx: the tree imports it (huggingface_hub 1.x did)
}
SWAP = "from sparse_t5 import SparseT5ForConditionalGeneration as T5ForConditionalGeneration  # peer swap\n"
ALIAS = ("from sparse_t5 import SparseT5ForConditionalGeneration as _Sparse  # peer alias\n"
         "class T5ForConditionalGeneration(_Sparse):  # named as HF's class, for class-name-keyed harness code\n"
         "    pass\n")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def sh(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def make_venv(path: str, library: str, tools: list[str]) -> str:
    import torch

    torch_version = torch.__version__.split("+")[0]
    sh([sys.executable, "-m", "venv", path])
    py = os.path.join(path, "bin", "python")
    sh([py, "-m", "pip", "install", "--quiet", f"torch=={torch_version}", f"transformers=={library}", "safetensors",
        "numpy", "tqdm", *tools])
    return py


def patch(test_file: str, out_file: str, insert: str) -> None:
    """Insert `insert` at module level just before the first class: after the import block, so it
    rebinds every later use in the module (all_model_classes, the testers, TestAsymmetricT5)."""
    with open(test_file) as f:
        lines = f.readlines()
    first_class = next(i for i, line in enumerate(lines) if line.startswith("class "))
    with open(out_file, "w") as f:
        f.writelines(lines[:first_class] + [insert, "\n\n"] + lines[first_class:])


def outcomes(junit: str) -> dict[str, str]:
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        kinds = {child.tag for child in case}
        result[name] = ("failed" if "failure" in kinds else "error" if "error" in kinds
                        else "skipped" if "skipped" in kinds else "passed")
    return result


def run_tree(py: str, tree: str, test_file: str, junit: str, workers: int) -> float:
    env = dict(os.environ, **OFFLINE, PYTHONPATH=ROOT)
    env.pop("RUN_SLOW", None)
    t0 = time.time()
    subprocess.run([py, "-m", "pytest", test_file, "-p", "no:cacheprovider", "--timeout", "300", "-q",
                    "-n", str(workers), f"--junitxml={junit}"], cwd=tree, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def counts(result: dict[str, str]) -> str:
    c = {k: sum(v == k for v in result.values()) for k in ("passed", "failed", "error", "skipped")}
    return f"{len(result)} tests: {c['passed']} passed, {c['failed'] + c['error']} failed, {c['skipped']} skipped"


def peer_version(tree_version: str, library: str, workers: int, keep: bool) -> bool:
    archive = os.path.join(PEER_DIR, f"transformers-{tree_version}-tests.tar.gz")
    work = tempfile.mkdtemp(prefix=f"sparse-t5-peer-{tree_version}-")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        (tree,) = [os.path.join(work, d) for d in os.listdir(work)]
        py = make_venv(os.path.join(work, "venv"), library, PEER_VERSIONS[tree_version])
        site = subprocess.check_output([py, "-c", "import transformers, os; print(os.path.dirname(transformers.__file__))"],
                                       text=True).strip()
        os.makedirs(os.path.join(tree, "src"), exist_ok=True)
        os.symlink(site, os.path.join(tree, "src", "transformers"))
        original = os.path.join(tree, T5_TESTS)
        runs = {}
        for label, insert in (("control", None), ("swap", SWAP), ("alias", ALIAS)):
            test_file = original if insert is None else original.replace(".py", f"_{label}.py")
            if insert is not None:
                patch(original, test_file, insert)
            junit = os.path.join(work, f"{label}.xml")
            seconds = run_tree(py, tree, os.path.relpath(test_file, tree), junit, workers)
            runs[label] = outcomes(junit)
            print(f"[{tree_version} tree, transformers {library}] {label}: {counts(runs[label])} in {seconds:.0f} s",
                  flush=True)
        return compare(tree_version, library, runs)
    finally:
        if keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def known_for(tree_version: str, library: str) -> dict[str, dict]:
    with open(KNOWN) as f:
        entries = json.load(f)["differences"]
    key = tree_version if library == tree_version else f"{tree_version}@{library}"
    return {e["test"]: e for e in entries if key in e["versions"]}


def compare(tree_version: str, library: str, runs: dict[str, dict[str, str]]) -> bool:
    control, swap, alias = runs["control"], runs["swap"], runs["alias"]
    ok = True
    broken = sorted(t for t, o in control.items() if o in ("failed", "error"))
    if len(control) < 100 or any(t.endswith("collection failure") for t in broken):
        print(f"THE TREE DID NOT RUN ({counts(control)}): {broken[:5]}")
        return False
    if broken and library == tree_version:
        print(f"CONTROL FAILS ({len(broken)}): the environment is broken, not our class: {broken[:10]}")
        ok = False
    differences = {t: o for t, o in swap.items() if control.get(t) == "passed" and o != "passed"}
    known = known_for(tree_version, library)
    print(f"swap-only differences: {len(differences)} "
          f"({sum(o != 'skipped' for o in differences.values())} failures, "
          f"{sum(o == 'skipped' for o in differences.values())} skips)")
    for test, outcome in sorted(differences.items()):
        entry = known.get(test)
        if entry is None:
            print(f"  UNEXPLAINED {outcome}: {test} (alias run: {alias.get(test)})")
            ok = False
        elif entry["kind"] == "harness" and alias.get(test) != "passed":
            print(f"  NOT A HARNESS ARTEFACT {outcome}: {test}: fails in the alias run too ({alias.get(test)})")
            ok = False
        else:
            print(f"  known {outcome} ({entry['kind']}): {test}: {entry['reason']}")
    for test in sorted(set(known) - set(differences)):
        print(f"  stale entry (no longer differs): {test}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", nargs="*", default=sorted(PEER_VERSIONS), help="test-tree versions to run")
    parser.add_argument("--library", help="transformers to install instead of the tree's own version")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (venv, trees, junit XML)")
    args = parser.parse_args()
    ok = True
    for version in args.versions:
        ok &= peer_version(version, args.library or version, args.workers, args.keep)
    print("peer suite:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
