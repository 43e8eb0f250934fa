"""Timing in a fresh process: each measurement in a new child, the models built there."""

from __future__ import annotations

import _thread
import functools
import os
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from test_local_oracle import FAST, REFERENCE, SMALL, Builder
from torch import nn

from latency.cache import DiskLatencyCache
from latency.fresh_process import FreshProcessTimer, TimingJob
from latency.harness import TimingSettings
from latency.local_oracle import LocalOracle
from search.errors import ArchtreeError


def model_recording_pid(path: str) -> nn.Module:
    """A small model; the process that builds it appends its pid to `path`."""
    with open(path, "a") as out:
        out.write(f"{os.getpid()}\n")
    return nn.Sequential(nn.Linear(16, 16))


def job(candidate, reference=None) -> TimingJob:
    return TimingJob(candidate, reference, (16,), batch_size=4, dtype="float32", settings=FAST)


def test_a_child_tells_how_many_runs_it_has_timed_as_often_as_asked() -> None:
    timer = FreshProcessTimer()
    exact = TimingSettings(warmup_runs=2, warmup_s=0.0, min_runs=4, min_time_s=0.0,
                           max_remeasures=0)  # fmt: skip
    small = functools.partial(nn.Linear, 16, 16)
    told: list[int] = []
    each_run = replace(job(small, small), settings=exact, report_every_s=0.0)
    timer.run(each_run, told.append)
    assert told == list(range(1, 13))  # (2 warm-up + 4) runs of each model
    told.clear()
    timer.run(replace(each_run, report_every_s=None), told.append)
    assert told == []  # not asked to report
    timer.run(each_run)  # reports nobody listens to are read and dropped


def test_each_timing_runs_in_a_new_child_process(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    factory = functools.partial(model_recording_pid, str(pids))
    timer = FreshProcessTimer()
    alone, reference, ratio = timer.run(job(factory))
    assert alone.n >= FAST.min_runs and reference is None and ratio is None
    candidate, reference, ratio = timer.run(job(factory, factory))
    assert reference is not None and ratio is not None and ratio > 0
    built_in = [int(line) for line in pids.read_text().split()]
    # Three builds, in two children: one per timing, none in this process.
    assert len(built_in) == 3
    assert os.getpid() not in built_in
    assert built_in[0] != built_in[1] == built_in[2]


def test_a_fresh_process_oracle_measures_without_building_here() -> None:
    builder = Builder()
    oracle = LocalOracle(builder, batch_size=8, settings=FAST, fresh_process=True)  # type: ignore[arg-type]
    assert oracle.fresh_process
    result = oracle.measure(SMALL, REFERENCE)  # type: ignore[arg-type]
    assert result.ratio < 1 / 3
    assert result.candidate.median_ms < result.reference.median_ms
    assert result.fingerprint["process"] == "fresh"
    assert oracle.measure_reference(REFERENCE).n >= FAST.min_runs  # type: ignore[arg-type]
    assert oracle.measure(SMALL, REFERENCE).cached  # type: ignore[arg-type]
    assert oracle.measurements == 2
    assert builder.builds == 0


def test_fresh_and_shared_timings_are_cached_apart(tmp_path: Path) -> None:
    cache = DiskLatencyCache(tmp_path)
    shared = LocalOracle(Builder(), batch_size=8, settings=FAST, cache=cache)  # type: ignore[arg-type]
    assert shared.fingerprint()["process"] == "shared"
    shared.measure(SMALL, REFERENCE)  # type: ignore[arg-type]
    fresh = LocalOracle(Builder(), batch_size=8, settings=FAST, cache=cache, fresh_process=True)  # type: ignore[arg-type]
    assert not fresh.measure(SMALL, REFERENCE).cached  # type: ignore[arg-type]


def test_an_unpicklable_builder_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ArchtreeError, match="picklable"):
        LocalOracle(lambda spec: nn.Linear(4, 4), fresh_process=True)


def test_a_child_that_dies_is_reported_not_awaited_forever() -> None:
    timer = FreshProcessTimer()
    with pytest.raises(ArchtreeError, match="timing process died .*exit code 3"):
        timer.run(job(functools.partial(os._exit, 3)))
    # The next job gets a new child.
    alone, _, _ = timer.run(job(functools.partial(nn.Linear, 16, 16)))
    assert alone.n >= FAST.min_runs


def failing_model(message: str) -> nn.Module:
    raise ArchtreeError(message)


def test_an_error_in_the_child_is_raised_here_with_its_message() -> None:
    with pytest.raises(ArchtreeError, match="the spec does not match"):
        FreshProcessTimer().run(job(functools.partial(failing_model, "the spec does not match")))


def test_no_process_is_left_running_after_a_timing() -> None:
    import multiprocessing

    FreshProcessTimer().run(job(functools.partial(nn.Linear, 16, 16)))
    assert multiprocessing.active_children() == []


def test_timing_settings_travel_to_the_child() -> None:
    many = TimingSettings(warmup_runs=1, warmup_s=0.0, min_runs=60, min_time_s=0.0, max_runs=60)
    stats, _, _ = FreshProcessTimer().run(
        TimingJob(functools.partial(nn.Linear, 8, 8), None, (8,), 2, "float32", many)
    )
    assert stats.n == 60


def test_a_ctrl_c_that_lands_as_the_parent_starts_to_wait_stops_the_timing_at_once(
    tmp_path: Path,
) -> None:
    # A signal that arrives just before the parent blocks reading the child's answer does not
    # wake it: interrupt_main sets the signal's flag as such a signal does, and wakes nothing.
    pids = tmp_path / "pids"
    warmup_s = 60.0
    long_job = replace(
        job(functools.partial(model_recording_pid, str(pids))),
        settings=replace(FAST, warmup_s=warmup_s),
    )

    main = threading.main_thread().ident

    def waiting_on_the_child() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "connection.py")):
                return True
            frame = frame.f_back
        return False

    def interrupt_once_built() -> None:
        while not (pids.exists() and pids.read_text() and waiting_on_the_child()):
            time.sleep(0.01)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_built, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        FreshProcessTimer().run(long_job)

    assert time.monotonic() - started < warmup_s  # stopped, not waited out
    assert not psutil.pid_exists(int(pids.read_text().split()[0]))


def test_a_ctrl_c_that_lands_as_the_child_starts_stops_it(tmp_path: Path, monkeypatch) -> None:
    from multiprocessing.context import ForkServerProcess

    start = ForkServerProcess.start
    children = []

    def interrupted_once_started(child: ForkServerProcess) -> None:
        start(child)
        children.append(child.pid)
        raise KeyboardInterrupt  # Ctrl-C lands as `start` returns

    monkeypatch.setattr(ForkServerProcess, "start", interrupted_once_started)
    long_job = replace(
        job(functools.partial(nn.Linear, 16, 16)), settings=replace(FAST, warmup_s=60)
    )
    with pytest.raises(KeyboardInterrupt):
        FreshProcessTimer().run(long_job)

    assert children and not psutil.pid_exists(children[0])  # stopped, not left timing
