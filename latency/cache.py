"""Latency caches: JSON-able results stored under a key built from fingerprint and hashes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
_SAFE_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,150}")


def cache_key(fingerprint_key: str, candidate_hash: str, reference_hash: str, kind: str) -> str:
    """The key of one result: its kind ("ref", "pair", ...), device and architectures."""
    return f"{kind}-{fingerprint_key}-{candidate_hash}-{reference_hash}"


class LatencyCache(Protocol):
    """Where latency results live; a miss returns None."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...


class MemoryLatencyCache:
    """Results kept in this process."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            value = self._entries.get(key)
        return copy.deepcopy(value) if value is not None else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._entries[key] = copy.deepcopy(value)

    def __len__(self) -> int:
        return len(self._entries)


class DiskLatencyCache:
    """Results kept as one JSON file per key in `directory`; survives the process.

    A result that cannot be written (the folder deleted and not creatable again, made
    read-only, a folder where its file goes) is not kept, and `on_write_failure` is called
    with a line saying so, once: the timings go on, uncached.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        on_write_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.on_write_failure = on_write_failure
        self.write_failures = 0

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # A missing file is a miss, and so is one cut short by a crash or edited by hand:
            # the next put replaces it.
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, sort_keys=True)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # deleted since: made again
            self._write(self._path(key), text)
        except OSError as error:
            self.write_failures += 1
            if self.write_failures == 1 and self.on_write_failure is not None:
                self.on_write_failure(
                    f"cannot write to the latency cache {self.directory} "
                    f"({error.strerror or error}): timings go on, but are not kept for later "
                    "runs; check the folder, or give another --cache-dir"
                )

    def _write(self, path: Path, text: str) -> None:
        handle, temp_name = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
                temp_file.write(text)
            # Readers in other processes see either the old file or the whole new one.
            os.replace(temp_name, path)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise

    def _path(self, key: str) -> Path:
        if _SAFE_FILE_NAME.fullmatch(key) and not key.startswith("."):
            return self.directory / f"{key}.json"
        return self.directory / f"{hashlib.sha256(key.encode('utf-8')).hexdigest()}.json"


def decoded(cached: dict[str, Any] | None, decode: Callable[..., T]) -> T | None:
    """`decode(cached)` for a cache hit, None for a miss or an entry of another shape (written
    by another version, or edited by hand) or of numbers no timing gives (a NaN, a ratio
    below zero; what `plausible()` refuses): the caller measures again and replaces it."""
    if cached is None:
        return None
    try:
        value = decode(cached)
        plausible = getattr(value, "plausible", None)
        return value if plausible is None or plausible() else None
    except (TypeError, KeyError, ValueError, OverflowError):
        return None
