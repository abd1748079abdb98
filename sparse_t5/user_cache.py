"""The user's cache directory for what sparse-t5 extracts or measures once per machine: the offline
sentence encoder (sparse_t5/dsi/encoder.py) and the kernel-method tables `sparse-t5 tune` writes
(sparse_t5/kernel_policy.py). ``$SPARSE_T5_CACHE`` overrides ``~/.cache/sparse-t5``."""
from __future__ import annotations

import os


def cache_dir() -> str:
    return os.environ.get("SPARSE_T5_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparse-t5")
