"""Latency cache in Redis, shared by every worker and oracle of a deployment."""

from __future__ import annotations

import json
from typing import Any

import redis


class RedisLatencyCache:
    """Results stored as JSON strings under `prefix + key` (no pickle, no expiry).

    Same interface as the caches in latency/cache.py: `get` returns None on a miss, and also
    on a value that is not a JSON object (written by hand or by an incompatible version).
    """

    def __init__(self, client: redis.Redis, prefix: str = "archtree:latency:") -> None:
        self.client = client
        self.prefix = prefix

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.client.get(self.prefix + key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.client.set(self.prefix + key, json.dumps(value, sort_keys=True))
