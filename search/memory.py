"""The memory this process has available, for checks that refuse work it cannot hold."""

from __future__ import annotations

import resource
from pathlib import Path

# A container's memory limit and use (cgroup v2, then v1), as the process sees them.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    (
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
    ),
)
# Larger limits stand for none (cgroup v1 says "no limit" as a number near 2**63).
NO_LIMIT_BYTES = 1 << 60


def available_memory_bytes() -> int | None:
    """The memory this process may still use: the machine's available memory (Linux's
    MemAvailable), less where its container's memory limit (cgroup) or its own address-space
    limit (`ulimit -v`) leaves less; None where none of them is known."""
    known = [
        value
        for value in (_machine_available(), _container_available(), _address_space_left())
        if value is not None
    ]
    return min(known) if known else None


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: torch's on the CPU (a RuntimeError) or a
    GPU, or Python's MemoryError."""
    if isinstance(error, MemoryError):
        return True
    name = type(error).__name__
    text = str(error)
    return name == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def _machine_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _container_available() -> int | None:
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= NO_LIMIT_BYTES:
            return None
        return max(0, int(limit) - usage)
    return None


def _address_space_left() -> int | None:
    """What `ulimit -v` leaves this process of address space: its limit less its size now."""
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, limit - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        return None
    return None
