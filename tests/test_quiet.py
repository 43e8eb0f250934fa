"""A timing on this machine runs alone: the search's work in other threads waits for it."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from search.budget import parse_budget
from search.engine import run_search
from search.interfaces import ThreadExecutor
from search.quiet import QuietGate, quiet_gate
from tests.test_engine import make_context

BLOCKED_S = 0.3  # how long a thread that must wait is watched not to go on


def test_a_timing_waits_for_the_work_in_progress_and_holds_new_work_back():
    gate = QuietGate()
    working, release_work = threading.Event(), threading.Event()
    timed, release_timing, later_work = threading.Event(), threading.Event(), threading.Event()

    def work() -> None:
        with gate.work():
            working.set()
            release_work.wait()

    def timing() -> None:
        with gate.timing():
            timed.set()
            release_timing.wait()

    def more_work() -> None:
        with gate.work():
            later_work.set()

    threads = [threading.Thread(target=work)]
    threads[0].start()
    assert working.wait(5)
    threads.append(threading.Thread(target=timing))
    threads[1].start()
    assert not timed.wait(BLOCKED_S)  # the piece of work in progress is not cut short
    release_work.set()
    assert timed.wait(5)
    threads.append(threading.Thread(target=more_work))
    threads[2].start()
    assert not later_work.wait(BLOCKED_S)  # no new work while the timing runs
    release_timing.set()
    assert later_work.wait(5)
    for thread in threads:
        thread.join(5)


def test_work_inside_work_is_one_piece_and_a_timing_inside_work_is_refused():
    gate = QuietGate()
    waiting, inner_done = threading.Event(), threading.Event()

    def timing() -> None:
        waiting.set()
        with gate.timing():
            pass

    with gate.work():
        other = threading.Thread(target=timing)
        other.start()
        assert waiting.wait(5)
        # A timing is waiting for this piece; the piece's own inner work does not wait for it.
        with gate.work():
            inner_done.set()
        with pytest.raises(RuntimeError, match="would wait for itself"), gate.timing():
            pass
    other.join(5)
    assert inner_done.is_set() and not other.is_alive()


class RecordingGate(QuietGate):
    """A gate that keeps the interval of every timing and of every outermost piece of work."""

    def __init__(self) -> None:
        super().__init__()
        self.intervals: list[tuple[str, int, float, float]] = []
        self._inside = threading.local()

    @contextmanager
    def work(self):
        outermost = not getattr(self._inside, "value", False)
        with super().work():
            self._inside.value = True
            start = time.perf_counter()
            try:
                yield
            finally:
                if outermost:
                    self._inside.value = False
                    self._record("work", start)

    @contextmanager
    def timing(self):
        with super().timing():
            start = time.perf_counter()
            try:
                yield
            finally:
                self._record("timing", start)

    def _record(self, kind: str, start: float) -> None:
        self.intervals.append((kind, threading.get_ident(), start, time.perf_counter()))


def test_children_evaluated_in_threads_never_work_while_a_candidate_is_timed():
    context = make_context(width=2, branching=2, planned_steps=2, ft_steps=10)
    gate = context.oracle.gate = RecordingGate()
    with quiet_gate(gate):
        run_search(context, parse_budget("75%"), ThreadExecutor(2))
    timings = [(start, end) for kind, _, start, end in gate.intervals if kind == "timing"]
    work = [(thread, start, end) for kind, thread, start, end in gate.intervals if kind == "work"]
    assert len(timings) > 5 and len(work) > 50
    assert len({thread for thread, _, _ in work}) >= 2  # the children did run side by side
    for timing_start, timing_end in timings:
        overlapping = [w for w in work if w[1] < timing_end and timing_start < w[2]]
        assert not overlapping, (timing_start, timing_end, overlapping[:3])
