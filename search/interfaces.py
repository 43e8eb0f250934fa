"""The small interfaces the engine needs; other packages implement them.

`search` never imports Redis, Celery or HTTP code. A local run plugs in a local latency
oracle, an in-process executor and a console event sink; the service plugs in Redis-backed
ones. The engine code is the same.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from search.arch_spec import ArchSpec

# No run of a model the search could time takes an hour: a cached median above it was edited.
LONGEST_PLAUSIBLE_MS = 3_600_000.0


def _is_number(value: object) -> bool:
    """Whether `value` is an int or float (not a bool, which is an int to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class TimingStats:
    """Summary of repeated wall-clock timings of one model, in milliseconds."""

    median_ms: float
    p90_ms: float
    iqr_ms: float
    cv: float
    n: int
    mean_ms: float = 0.0
    # On a GPU: the median time the host spent launching a run's kernels (the call returning,
    # before the device finished them); None where the device runs the model in the call.
    launch_ms: float | None = None
    # Taken from the latency cache, not timed just now: said to the user, never stored, and
    # no part of the timing (two equal timings are equal wherever they came from).
    cached: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["cached"]
        return out

    def plausible(self) -> bool:
        """Whether these could be timings: numbers, a median above zero and under an hour, no
        spread below zero, nothing infinite or NaN, a whole number of runs (a cache entry
        edited or damaged may hold anything)."""
        spreads = (self.p90_ms, self.iqr_ms, self.cv, self.mean_ms, self.launch_ms or 0.0)
        return (
            all(_is_number(value) for value in (self.median_ms, *spreads))
            and 0 < self.median_ms < LONGEST_PLAUSIBLE_MS
            and all(math.isfinite(value) and value >= 0 for value in spreads)
            and isinstance(self.n, int)
            and not isinstance(self.n, bool)
            and self.n >= 1
        )


@dataclass
class LatencyMeasurement:
    """One candidate timed interleaved with the reference (the unpruned model).

    `ratio` is candidate time over reference time from the same interleaved run; budget
    decisions use `ratio * baseline_ms`, where baseline_ms is the job's own measurement of the
    unpruned model, so drift of the machine during a job cancels out.
    """

    arch_hash: str
    ratio: float
    candidate: TimingStats
    reference: TimingStats
    fingerprint: dict[str, Any]
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["candidate"], out["reference"] = self.candidate.to_dict(), self.reference.to_dict()
        return out

    def plausible(self) -> bool:
        """Whether this could be a timing: a finite ratio above zero of plausible timings."""
        return (
            _is_number(self.ratio)
            and math.isfinite(self.ratio)
            and self.ratio > 0
            and self.candidate.plausible()
            and self.reference.plausible()
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyMeasurement:
        return cls(
            arch_hash=data["arch_hash"],
            ratio=float(data["ratio"]),
            candidate=TimingStats(**data["candidate"]),
            reference=TimingStats(**data["reference"]),
            fingerprint=dict(data["fingerprint"]),
            cached=bool(data.get("cached", False)),
        )


class LatencyOracle(Protocol):
    """Measures latency of architectures on one target device."""

    def fingerprint(self) -> dict[str, Any]:
        """Device class, host, runtime and versions, threads, batch, dtype."""

    def measure_reference(
        self, reference: ArchSpec, *, confirm: bool = False, refresh: bool = False
    ) -> TimingStats:
        """Time the unpruned model alone: the job's baseline L(M0); with `refresh`, timed
        again rather than taken from a cache (and cached anew)."""

    def offer_model(self, spec: ArchSpec, model: Any) -> None:
        """A model already built for `spec`, which an oracle timing in this process may use
        instead of rebuilding it; oracles that time elsewhere ignore it."""

    def measure(
        self, candidate: ArchSpec, reference: ArchSpec, *, confirm: bool = False
    ) -> LatencyMeasurement:
        """Time `candidate` interleaved with `reference`. `confirm` asks for more repeats.

        Results are cached under (fingerprint, candidate hash, reference hash); a cached
        result comes back with `cached=True` and costs no device time.
        """


class Executor(Protocol):
    """Runs independent tasks (the children of one depth), possibly in parallel."""

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        """Results in the order of `tasks`."""


class SequentialExecutor:
    """Runs tasks one after another in this process (the default on a local device)."""

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        return [fn(task) for task in tasks]


class ThreadExecutor:
    """Runs tasks in a pool of threads of this process (torch releases the GIL).

    On the local device, fine-tuning in one thread slows the timing in another: use it when
    latency is measured elsewhere, or accept noisier measurements for a faster search.
    """

    def __init__(self, workers: int, on_stop: Callable[[], None] | None = None) -> None:
        self.workers = workers
        # Called when `map` stops early (Ctrl-C, or a task's error): tasks not started are
        # dropped, and this tells the running ones to stop (a SearchContext's `cancelled`),
        # since they are waited for.
        self.on_stop = on_stop

    def map(self, fn: Callable[[Any], Any], tasks: Iterable[Any]) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        gate = _TaskGate()
        name = f"archtree-task-{next(_pool_numbers)}"
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=name) as pool:
            futures = []
            try:
                for task in tasks:
                    futures.append(pool.submit(gate.run, fn, task))
                return [_result(future) for future in futures]
            except BaseException:
                # The gate, not the futures, drops the tasks not started: a Ctrl-C that lands
                # as `submit` returns leaves a queued task whose future was never listed.
                gate.close()
                if self.on_stop is not None:
                    self.on_stop()
                gate.wait_out()
                # And the threads are gone before the error goes on, a Ctrl-C again or not.
                with _stops_ignored():
                    _despite_interrupts(lambda: pool.shutdown(wait=True))
                    # A Ctrl-C that lands as the pool starts a thread, once the thread runs
                    # but before the pool lists it, leaves it out of those `shutdown` joins.
                    _despite_interrupts(lambda: _join_threads_named(name))
                raise


_pool_numbers = itertools.count()


def _join_threads_named(prefix: str) -> None:
    """Join every running thread of the pool whose threads' names start with `prefix`."""
    for thread in threading.enumerate():
        if thread.name.startswith(f"{prefix}_") and thread.is_alive():
            thread.join()


# How long the main thread waits on a task at a time: a signal that lands just before a
# wait blocks does not end it, and its handler (Ctrl-C's KeyboardInterrupt) runs only once
# the thread is back in Python.
SIGNAL_CHECK_S = 0.1


def _result(future: Future) -> Any:
    """The task's result, waited for in turns of SIGNAL_CHECK_S."""
    while not wait([future], timeout=SIGNAL_CHECK_S).done:
        pass
    return future.result()


class _TaskGate:
    """Lets tasks start until it is closed, and knows how many are running."""

    def __init__(self) -> None:
        self._open = True
        self._running = 0
        self._changed = threading.Condition()

    def run(self, fn: Callable[[Any], Any], task: Any) -> Any:
        """`fn(task)`, unless the gate was closed before it started (then None)."""
        with self._changed:
            if not self._open:
                return None
            self._running += 1
        try:
            return fn(task)
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._open = False

    def wait_out(self) -> None:
        """Wait until every task that started has ended, whatever interrupts the wait: a
        process that exits while a thread still runs torch may abort instead ("terminate
        called without an active exception")."""

        def ended() -> None:
            # In turns of SIGNAL_CHECK_S: a Ctrl-C that lands meanwhile is raised in here,
            # where it is absorbed, not once the wait is over.
            with self._changed:
                while not self._changed.wait_for(
                    lambda: self._running == 0, timeout=SIGNAL_CHECK_S
                ):
                    pass

        _despite_interrupts(ended)


# What stops a run: Ctrl-C, and SIGTERM (a service manager, `kill`).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stops_ignored() -> Iterator[None]:
    """Ctrl-C and SIGTERM do nothing in the block, where this thread joins others: a join
    that Ctrl-C interrupts (Python 3.11) takes the thread for ended while it still runs,
    releasing the lock the thread holds until it exits, and a join after returns at once.
    The block is short: the threads' tasks have ended, and the threads exit. Only the main
    thread sees signals raise; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {stop: signal.signal(stop, signal.SIG_IGN) for stop in STOP_SIGNALS}
    try:
        yield
    finally:
        for stop, handler in previous.items():
            if handler is not None:  # None: set outside Python, and not ours to put back
                signal.signal(stop, handler)


def _despite_interrupts(wait: Callable[[], None]) -> None:
    """`wait()` to its end, called again after each KeyboardInterrupt that ends it early."""
    while True:
        try:
            wait()
            return
        except KeyboardInterrupt:
            continue


class EventSink(Protocol):
    """Receives what the engine does: the CLI renders it, the service stores it."""

    def emit(self, kind: str, **data: Any) -> None: ...


@dataclass
class ListEventSink:
    """Keeps events in memory (tests, reports)."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def emit(self, kind: str, **data: Any) -> None:
        self.events.append({"kind": kind, **data})


class NodeStore(Protocol):
    """Where candidate weights live between the steps of a search."""

    def put(self, node_id: str, state_dict: dict[str, Any]) -> None: ...

    def get(self, node_id: str) -> dict[str, Any]: ...

    def keep_only(self, node_ids: set[str]) -> None:
        """Forget the weights of every node but those named: the search no longer uses them."""
        ...


@dataclass
class MemoryNodeStore:
    """Node weights in this process's memory."""

    weights: dict[str, dict[str, Any]] = field(default_factory=dict)

    def put(self, node_id: str, state_dict: dict[str, Any]) -> None:
        self.weights[node_id] = {k: v.detach().clone() for k, v in state_dict.items()}

    def get(self, node_id: str) -> dict[str, Any]:
        return self.weights[node_id]

    def keep_only(self, node_ids: set[str]) -> None:
        """Drop the weights of every node but those named (the others are no longer needed)."""
        for node_id in set(self.weights) - node_ids:
            del self.weights[node_id]
