"""Children evaluated in parallel threads (`prune --jobs N`) stop with the command."""

from __future__ import annotations

import _thread
import signal
import threading

import pytest

from search.interfaces import ThreadExecutor


def test_ctrl_c_drops_the_tasks_not_started_and_waits_out_those_running():
    main = threading.main_thread().ident
    stop = threading.Event()  # what the running tasks are told: a SearchContext's `cancelled`
    both_running = threading.Barrier(2)
    started, ended = [], []

    def task(number: int) -> int:
        started.append(number)
        both_running.wait(10)
        if number == 0:
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the children run
        stop.wait(10)  # each stops at its next fine-tuning step
        if number == 0:
            signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C again, while they end
            threading.Event().wait(0.5)  # ... and this one takes a little longer to
        ended.append(number)
        return number

    with pytest.raises(KeyboardInterrupt):
        ThreadExecutor(2, on_stop=stop.set).map(task, range(6))

    assert sorted(started) == [0, 1] and sorted(ended) == [0, 1]
    assert not _task_threads()


def _task_threads() -> list[threading.Thread]:
    """The executors' threads still running (other libraries' pools, torch.compile's, not)."""
    return [t for t in threading.enumerate() if t.name.startswith("archtree-task-")]


def test_a_thread_that_ctrl_c_kept_the_pool_from_listing_is_joined_too(monkeypatch):
    """Ctrl-C can land once the pool's new thread runs but before the pool lists it among
    those its shutdown joins (the main thread was slow to come back from starting it)."""
    import concurrent.futures.thread as pool_threads

    release = threading.Event()  # the unlisted thread is slow to get going
    start, worker = threading.Thread.start, pool_threads._worker

    def start_then_ctrl_c(thread: threading.Thread) -> None:
        start(thread)
        if thread.name.startswith("archtree-task-") and thread.name.endswith("_1"):
            threading.Timer(0.3, release.set).start()
            raise KeyboardInterrupt

    def slow_second_thread(*args) -> None:
        if threading.current_thread().name.endswith("_1"):
            release.wait(10)
        worker(*args)

    monkeypatch.setattr(threading.Thread, "start", start_then_ctrl_c)
    monkeypatch.setattr(pool_threads, "_worker", slow_second_thread)
    stop = threading.Event()

    def task(number: int) -> int:
        stop.wait(10)
        return number

    with pytest.raises(KeyboardInterrupt):
        ThreadExecutor(2, on_stop=stop.set).map(task, range(6))

    assert release.is_set() and not _task_threads()


def test_a_ctrl_c_that_lands_as_the_command_starts_to_wait_is_not_lost():
    # A signal that arrives just before the main thread blocks in its wait does not wake it:
    # interrupt_main sets the signal's flag as such a signal does, and wakes nothing.
    stop = threading.Event()
    both_running = threading.Barrier(2)
    started, told = [], []

    def task(number: int) -> int:
        started.append(number)
        both_running.wait(10)
        if number == 0:
            _thread.interrupt_main()
        told.append(stop.wait(10))  # True: told to stop, not tired of waiting
        return number

    with pytest.raises(KeyboardInterrupt):
        ThreadExecutor(2, on_stop=stop.set).map(task, range(6))

    assert sorted(started) == [0, 1] and told == [True, True]


def test_a_task_submitted_as_ctrl_c_lands_never_starts(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    submit = ThreadPoolExecutor.submit

    def interrupted_as_task_2_is_queued(pool, fn, /, *args, **kwargs):
        future = submit(pool, fn, *args, **kwargs)
        if args[-1] == 2:
            raise KeyboardInterrupt  # Ctrl-C lands after the task is queued, before it is listed
        return future

    monkeypatch.setattr(ThreadPoolExecutor, "submit", interrupted_as_task_2_is_queued)
    stop = threading.Event()
    started = []

    def task(number: int) -> int:
        started.append(number)
        stop.wait(10)
        return number

    with pytest.raises(KeyboardInterrupt):
        ThreadExecutor(2, on_stop=stop.set).map(task, range(6))

    assert set(started) <= {0, 1}, started
    assert not _task_threads()


def test_the_threads_are_joined_to_their_end_whatever_ctrl_c_and_sigterm_do_meanwhile():
    """A join that Ctrl-C interrupts (Python 3.11) takes its thread for ended while it still
    runs: the executor's last wait ignores Ctrl-C and SIGTERM, and puts their handlers back."""
    from search.interfaces import _stops_ignored

    main = threading.main_thread().ident
    release = threading.Event()
    before = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}

    def busy() -> None:
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.pthread_kill(main, stop)  # while the main thread joins this one
        release.wait(10)

    thread = threading.Thread(target=busy)
    with _stops_ignored():
        thread.start()
        threading.Timer(0.5, release.set).start()
        thread.join()
        assert not thread.is_alive() and release.is_set()
    assert {stop: signal.getsignal(stop) for stop in before} == before
