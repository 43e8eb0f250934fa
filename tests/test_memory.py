"""The memory a process may still use: its container's limits, read as the kernel writes them."""

from __future__ import annotations

from pathlib import Path

from search.memory import CGROUP_HIERARCHIES, _container_available, out_of_memory

MIB = 1024**2


def cgroup_tree(root: Path, own: str, levels: dict[str, tuple[str, int, int]]) -> Path:
    """A cgroup v2 hierarchy under `root`: each level's memory.max, memory.current and the
    reclaimable page cache in its memory.stat; the process's own cgroup is `own`."""
    for path, (limit, usage, cache) in levels.items():
        folder = root / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "memory.max").write_text(f"{limit}\n")
        (folder / "memory.current").write_text(f"{usage}\n")
        (folder / "memory.stat").write_text(f"anon 1\ninactive_file {cache}\nactive_file 3\n")
    own_cgroups = root / "self-cgroup"
    own_cgroups.write_text(f"0::{own}\n")
    return own_cgroups


def v2_at(root: Path) -> tuple[tuple[str, ...], ...]:
    (mount, *names) = CGROUP_HIERARCHIES[0]
    return ((str(root), *names),)


def test_a_limit_above_the_processs_own_cgroup_counts_and_page_cache_is_not_used(tmp_path):
    own_cgroups = cgroup_tree(
        tmp_path,
        "/jobs/job-1",
        {
            "/": ("max", 9000 * MIB, 0),
            "/jobs": (str(1024 * MIB), 700 * MIB, 300 * MIB),  # the container's limit
            "/jobs/job-1": ("max", 600 * MIB, 200 * MIB),
        },
    )
    # 1 GiB less the 400 MiB the container uses beyond the cache it may reclaim.
    assert _container_available(v2_at(tmp_path), own_cgroups) == 1024 * MIB - 400 * MIB


def test_the_lowest_limit_on_the_way_up_is_what_is_left(tmp_path):
    own_cgroups = cgroup_tree(
        tmp_path,
        "/a/b",
        {"/a": (str(4096 * MIB), 1000 * MIB, 0), "/a/b": (str(1024 * MIB), 1000 * MIB, 0)},
    )
    assert _container_available(v2_at(tmp_path), own_cgroups) == 24 * MIB


def test_no_limit_is_none(tmp_path):
    own_cgroups = cgroup_tree(tmp_path, "/", {"/": ("max", 500 * MIB, 0)})
    assert _container_available(v2_at(tmp_path), own_cgroups) is None
    # cgroup v1 says "no limit" as a number near 2**63.
    v1_none = cgroup_tree(tmp_path / "v1", "/", {"/": (str(2**63 - 4096), 500 * MIB, 0)})
    assert _container_available(v2_at(tmp_path / "v1"), v1_none) is None


def test_allocations_that_fail_are_told_from_other_errors():
    import pytest
    import torch

    with pytest.raises(RuntimeError) as failed:
        torch.empty(1 << 60, dtype=torch.uint8)  # more than any address space holds
    assert out_of_memory(failed.value)
    assert out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
