"""Latency caches, cache keys and device fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from latency.cache import DiskLatencyCache, LatencyCache, MemoryLatencyCache, cache_key
from latency.fingerprint import device_fingerprint, fingerprint_key

VALUE = {"median_ms": 1.5, "p90_ms": 2.0, "n": 30, "nested": {"shape": [3, 8, 8]}}


@pytest.fixture(params=["memory", "disk"])
def cache(request: pytest.FixtureRequest, tmp_path: Path) -> LatencyCache:
    return MemoryLatencyCache() if request.param == "memory" else DiskLatencyCache(tmp_path)


def test_miss_then_hit(cache: LatencyCache) -> None:
    assert cache.get("k") is None
    cache.put("k", VALUE)
    assert cache.get("k") == VALUE
    cache.put("k", {"median_ms": 3.0})
    assert cache.get("k") == {"median_ms": 3.0}


def test_returned_values_are_copies(cache: LatencyCache) -> None:
    cache.put("k", VALUE)
    got = cache.get("k")
    assert got is not None
    got["nested"]["shape"].append(99)
    assert cache.get("k") == VALUE


def test_disk_cache_survives_a_new_instance(tmp_path: Path) -> None:
    DiskLatencyCache(tmp_path / "cache").put("k", VALUE)
    assert DiskLatencyCache(tmp_path / "cache").get("k") == VALUE


def test_disk_cache_treats_a_corrupt_file_as_a_miss_and_overwrites_it(tmp_path: Path) -> None:
    cache = DiskLatencyCache(tmp_path)
    cache.put("k", VALUE)
    (path,) = tmp_path.glob("*.json")
    path.write_text('{"median_ms": 1.', encoding="utf-8")
    assert cache.get("k") is None
    path.write_text("[1, 2]", encoding="utf-8")
    assert cache.get("k") is None
    cache.put("k", VALUE)
    assert DiskLatencyCache(tmp_path).get("k") == VALUE


def test_disk_cache_leaves_no_temporary_files(tmp_path: Path) -> None:
    cache = DiskLatencyCache(tmp_path)
    for index in range(5):
        cache.put(f"k{index}", VALUE)
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"k{i}.json" for i in range(5)]


def test_disk_cache_keys_with_odd_characters_stay_inside_the_directory(tmp_path: Path) -> None:
    cache = DiskLatencyCache(tmp_path / "cache")
    cache.put("../escape/key:with spaces", VALUE)
    assert cache.get("../escape/key:with spaces") == VALUE
    assert cache.get("../escape/other") is None
    assert [path.parent for path in tmp_path.rglob("*.json")] == [tmp_path / "cache"]


def test_cache_key_separates_every_part() -> None:
    base = cache_key("fp", "cand", "ref", "pair")
    assert (
        len(
            {
                base,
                *(
                    cache_key(*parts)
                    for parts in [
                        ("fp2", "cand", "ref", "pair"),
                        ("fp", "cand2", "ref", "pair"),
                        ("fp", "cand", "ref2", "pair"),
                        ("fp", "cand", "ref", "pair-confirm"),
                    ]
                ),
            }
        )
        == 5
    )
    assert cache_key("fp", "cand", "ref", "pair") == base


def test_fingerprint_fields_and_stable_key() -> None:
    fingerprint = device_fingerprint("cpu", 1, 4, "float32", (3, 32, 32))
    assert fingerprint["device_class"] == "local"
    assert fingerprint["runtime"] == "torch"
    assert fingerprint["input_shape"] == [3, 32, 32]
    assert fingerprint["threads"] == 1 and fingerprint["batch_size"] == 4
    for field in ("host", "cpu", "torch_version", "python_version", "dtype"):
        assert fingerprint[field]
    assert "gpu" not in fingerprint
    key = fingerprint_key(fingerprint)
    assert len(key) == 16 and int(key, 16) >= 0
    assert fingerprint_key(dict(reversed(list(fingerprint.items())))) == key


def test_fingerprint_key_changes_with_what_affects_timing() -> None:
    keys = {
        fingerprint_key(device_fingerprint("cpu", 1, 1, "float32", (3, 32, 32))),
        fingerprint_key(device_fingerprint("cpu", 2, 1, "float32", (3, 32, 32))),
        fingerprint_key(device_fingerprint("cpu", 1, 8, "float32", (3, 32, 32))),
        fingerprint_key(device_fingerprint("cpu", 1, 1, "float16", (3, 32, 32))),
        fingerprint_key(device_fingerprint("cpu", 1, 1, "float32", (3, 64, 64))),
        fingerprint_key(device_fingerprint("cpu", 1, 1, "float32", (3, 32, 32), "pi-5")),
    }
    assert len(keys) == 6


def test_a_result_that_cannot_be_written_is_said_once_and_the_timings_go_on(tmp_path: Path):
    said: list[str] = []
    cache = DiskLatencyCache(tmp_path / "cache", on_write_failure=said.append)
    cache.put("a", {"x": 1})
    (cache._path("b")).mkdir()  # a folder where b's file goes
    cache.put("b", {"x": 2})
    cache.put("b", {"x": 3})
    assert cache.get("a") == {"x": 1} and cache.get("b") is None
    assert len(said) == 1 and said[0].startswith(
        f"cannot write to the latency cache {tmp_path / 'cache'} ("
    )
    assert said[0].endswith("timings go on, but are not kept for later runs; check the folder, "
                            "or give another --cache-dir")  # fmt: skip
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_a_cache_folder_deleted_during_a_run_is_made_again(tmp_path: Path):
    import shutil

    said: list[str] = []
    cache = DiskLatencyCache(tmp_path / "cache", on_write_failure=said.append)
    shutil.rmtree(tmp_path / "cache")
    cache.put("a", {"x": 1})
    assert cache.get("a") == {"x": 1} and said == []
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("")  # a file where the folder was: it cannot be made
    cache.put("b", {"x": 2})
    assert cache.get("b") is None and len(said) == 1
