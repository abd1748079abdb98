"""Process memory as the OS sees it (Linux /proc, with a getrusage fallback): what the trainer
reports per phase and what the recovery benchmark measures; and giving freed heap back to the OS
while loading (release_freed_memory)."""
from __future__ import annotations


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        raise RuntimeError("VmRSS is not available (/proc/self/status)")
    return rss


def peak_rss_bytes() -> int:
    """Peak resident set size since start, or since the last reset_peak_rss()."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0); False where the OS does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_memory():
    """Return freed heap memory to the OS (glibc's malloc_trim). Loading interleaves long-lived
    compressed tensors with large transient ones (each dense weight, its scores and masks), and glibc
    keeps the freed transients resident behind the long-lived ones: measured here on a 176 MB
    checkpoint at 0.9, the load peaked at 124 MB above the process without trimming and 73-77 MB with it (29 MB of model). A no-op where
    malloc_trim does not exist."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()
