"""Where archtree keeps its caches on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def archtree_home() -> Path:
    """$ARCHTREE_HOME, or ~/.cache/archtree."""
    return Path(os.environ.get("ARCHTREE_HOME") or Path.home() / ".cache" / "archtree")


def latency_cache_dir(override: str | None = None) -> Path:
    return Path(override) if override else archtree_home() / "latency-cache"
