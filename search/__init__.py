"""The Archtree search: latency-driven structured pruning as a tree search.

Pure algorithm and torch; no Redis, Celery or HTTP. See `search.engine` for the loop.
"""

from typing import Any

__all__ = ["load_pruned"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `import search.errors` stays cheap.
    if name == "load_pruned":
        from search.artifacts import load_pruned

        return load_pruned
    raise AttributeError(name)
