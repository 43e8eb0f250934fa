"""The memory this machine has available, for checks that refuse work it cannot hold."""

from __future__ import annotations


def available_memory_bytes() -> int | None:
    """The memory this machine has available (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
