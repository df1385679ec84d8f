"""Readings of this process's host memory (Linux /proc), for reports and the preflight checks."""
from __future__ import annotations


def reset_peak_rss() -> None:
    """Start the process's peak RSS (VmHWM) afresh: Linux resets it on writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """The process's peak RSS since the last reset (its lifetime peak where /proc is missing)."""
    import resource

    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_bytes(path: str, field: str) -> int | None:
    """A "Field: N kB" line of a Linux /proc file, in bytes; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
