"""Peak resident memory of this process on Linux, for CPU benchmarks.

Torch keeps no allocator statistics on the CPU, so a CPU benchmark runs each variant in a fresh child
process and reads that process's own high-water mark.
"""

from __future__ import annotations


def proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset the peak RSS (``VmHWM``) to the current RSS.

    ``ru_maxrss`` cannot be used instead: it survives fork+exec, so a child would report its parent's peak.
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
