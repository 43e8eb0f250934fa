"""The memory this process has available, for checks that refuse work it cannot hold."""

from __future__ import annotations

import resource
from pathlib import Path

# Where the memory controller of cgroup v2 (the unified hierarchy) and of v1 is mounted, the
# files of a cgroup's limit and use, the controllers of its line in /proc/self/cgroup (none
# for v2), and the memory.stat entry of the page cache it may reclaim (counted as used).
CGROUP_HIERARCHIES = (
    ("/sys/fs/cgroup", "memory.max", "memory.current", "", "inactive_file"),
    (
        "/sys/fs/cgroup/memory",
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "memory",
        "total_inactive_file",
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


def _container_available(
    hierarchies: tuple[tuple[str, ...], ...] = CGROUP_HIERARCHIES,
    own_cgroups: Path = Path("/proc/self/cgroup"),
) -> int | None:
    """What the memory limits of the process's cgroup and of those above it leave: the
    lowest limit less its use, the page cache it may reclaim not counted as used.
    `own_cgroups`: the process's cgroups, one line per hierarchy."""
    for mount, limit_file, usage_file, controller, reclaimable in hierarchies:
        own = _own_cgroup(own_cgroups, controller)
        if own is None:
            continue
        left = []
        folder = Path(mount, own.lstrip("/"))
        for level in (folder, *folder.parents):
            if not level.is_relative_to(mount):
                break
            try:
                limit = (level / limit_file).read_text().strip()
                usage = int((level / usage_file).read_text())
            except (OSError, ValueError):
                continue
            if not limit.isdigit() or int(limit) >= NO_LIMIT_BYTES:  # "max": none
                continue
            used = usage - _stat_entry(level / "memory.stat", reclaimable)
            left.append(max(0, int(limit) - used))
        if left:
            return min(left)
    return None


def _own_cgroup(own_cgroups: Path, controller: str) -> str | None:
    """The process's own cgroup path in the hierarchy of `controller` ("" for cgroup v2), from
    its cgroups' lines (`ID:CONTROLLERS:PATH`)."""
    try:
        lines = own_cgroups.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2] or "/"
    return None


def _stat_entry(path: Path, name: str) -> int:
    """An entry of a cgroup's memory.stat, 0 where it is not there."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        return 0
    return 0


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
