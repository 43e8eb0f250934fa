"""Keeping this machine quiet while a candidate is timed on it.

With several children evaluated at once in threads (`archtree prune --jobs`), one child's
fine-tuning would run while another child is timed on the same machine, and the timing would
measure the contention as much as the model. The search's work is done in short pieces
(a training step, a batch of outputs, one pruning), each inside `piece_of_work()`; a timing
runs inside `QuietGate.timing()`, which waits for the pieces in progress to end and holds new
ones back until it is done. Without a gate installed (one child at a time, or timing on
another machine) a piece of work waits for nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class QuietGate:
    """Pieces of work run together; a timing runs alone, ahead of pieces not yet started."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._working = 0
        self._timing = False
        self._timings_waiting = 0
        self._depth = threading.local()

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """One piece of work; a piece inside another counts as part of it."""
        depth = getattr(self._depth, "value", 0)
        if depth == 0:
            with self._condition:
                while self._timing or self._timings_waiting:
                    self._condition.wait()
                self._working += 1
        self._depth.value = depth + 1
        try:
            yield
        finally:
            self._depth.value = depth
            if depth == 0:
                with self._condition:
                    self._working -= 1
                    self._condition.notify_all()

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """A timing: alone on the machine, once the pieces of work in progress have ended."""
        if getattr(self._depth, "value", 0):
            raise RuntimeError("a timing inside a piece of work would wait for itself")
        with self._condition:
            self._timings_waiting += 1
            try:
                while self._timing or self._working:
                    self._condition.wait()
            finally:
                self._timings_waiting -= 1
            self._timing = True
        try:
            yield
        finally:
            with self._condition:
                self._timing = False
                self._condition.notify_all()


_installed: QuietGate | None = None


@contextlib.contextmanager
def quiet_gate(gate: QuietGate) -> Iterator[QuietGate]:
    """Make `gate` the one the search's pieces of work go through while the block runs."""
    global _installed
    previous, _installed = _installed, gate
    try:
        yield gate
    finally:
        _installed = previous


def piece_of_work() -> contextlib.AbstractContextManager[None]:
    """A piece of the search's work: it waits while a timing runs on this machine."""
    return _installed.work() if _installed is not None else contextlib.nullcontext()
