"""Loads the compiled ops (sparse_t5._C) after checking that they were built against the torch
that is running.

A C++ extension compiled against one torch release fails to load under another with an undefined
symbol, or worse loads and misbehaves. setup.py records the torch version it compiled against in
_build_info.json beside the extension; a mismatch raises an ImportError that names both versions
and the fix, before the library is loaded.
"""
from __future__ import annotations

import json
import os

import torch

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
REBUILD = "rebuild the extension against it: `pip install -e .` (or `pip install .`) in this environment"


def built_with_torch() -> str | None:
    """The torch version sparse_t5._C was compiled against, or None if not recorded."""
    try:
        with open(BUILD_INFO) as f:
            return json.load(f).get("torch")
    except (OSError, ValueError):
        return None


def check_build(built: str | None, running: str) -> None:
    """Raise ImportError if an extension built against `built` cannot run under torch `running`.
    The C++ ABI of libtorch is only stable within one release, so the versions must be equal."""
    if built is not None and built != running:
        raise ImportError(f"sparse_t5's C++ extension was built against torch {built}, but torch {running} is "
                          f"running; {REBUILD}.")


def load():
    override = os.environ.get("SPARSE_T5_OPS_LIBRARY")
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"SPARSE_T5_OPS_LIBRARY={override} is not a file")
        torch.ops.load_library(override)  # registers the same schemas and CPU bodies as _C
        return None
    check_build(built_with_torch(), torch.__version__)
    try:
        from . import _C
    except ImportError as err:
        raise ImportError(f"sparse_t5's C++ extension could not be loaded under torch {torch.__version__} "
                          f"({err}); {REBUILD}.") from err
    return _C


_C = load()
