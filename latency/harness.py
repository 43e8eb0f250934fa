"""Timing harness: repeated, warmed-up, adaptive wall-clock timing of torch models."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn

from latency.allocator import steady_allocator
from search.interfaces import TimingStats

# IQR of a normal distribution is 1.349 standard deviations; dividing by it makes the robust CV
# comparable to the usual std / mean.
_IQR_PER_SIGMA = 1.349


@dataclass
class TimingSettings:
    """How long and how often to time a model.

    Runs continue until both `min_runs` and `min_time_s` are reached, and stop at `max_runs`.
    A model timed alone whose CV is above `cv_threshold` is re-measured up to `max_remeasures`
    times. An interleaved timing goes on for up to `max_remeasures` more rounds of pairs while
    the standard error of its ratio is above `ratio_error`, and pools every round: a noisy
    machine gets more pairs, a quiet one no more than one round.
    """

    warmup_runs: int = 10
    warmup_s: float = 0.05
    min_runs: int = 25
    max_runs: int = 2000
    min_time_s: float = 0.25
    cv_threshold: float = 0.05
    ratio_error: float = 0.01
    max_remeasures: int = 2
    threads: int = 1

    def __post_init__(self) -> None:
        if self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ValueError(
                f"need 1 <= min_runs <= max_runs, got {self.min_runs}, {self.max_runs}"
            )
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.max_remeasures < 0 or self.warmup_runs < 0:
            raise ValueError("warmup_runs and max_remeasures must be >= 0")
        if self.ratio_error < 0:
            raise ValueError(f"ratio_error must be >= 0, got {self.ratio_error}")

    def scaled(self, factor: float = 4.0) -> TimingSettings:
        """Settings for a confirm measurement: `factor` times the runs and measuring time."""
        min_runs = max(1, round(self.min_runs * factor))
        return replace(
            self,
            min_runs=min_runs,
            min_time_s=self.min_time_s * factor,
            max_runs=max(self.max_runs, min_runs),
        )


def summarize(durations_ns: Sequence[int], launches_ns: Sequence[int] | None = None) -> TimingStats:
    """Median, p90, IQR, robust CV (IQR / 1.349 / median), n and mean of durations in ns, and
    the median of `launches_ns`, the host's part of each run, where given."""
    ms = np.asarray(durations_ns, dtype=np.float64) / 1e6
    p25, median, p75, p90 = np.percentile(ms, [25, 50, 75, 90])
    iqr = float(p75 - p25)
    cv = iqr / _IQR_PER_SIGMA / median if median > 0 else float("inf")
    return TimingStats(
        median_ms=float(median),
        p90_ms=float(p90),
        iqr_ms=iqr,
        cv=float(cv),
        n=len(ms),
        mean_ms=float(ms.mean()),
        launch_ms=float(np.median(launches_ns)) / 1e6 if launches_ns else None,
    )


def time_model(
    model: nn.Module,
    example_input: torch.Tensor,
    settings: TimingSettings,
    after_run: Callable[[], None] | None = None,
) -> TimingStats:
    """Time `model(example_input)` alone; re-measure while the CV is high, keep the best run.
    `after_run` is called after every run, warm-up included, outside the timed part."""
    with _timing_context([model], settings.threads):
        run = _timed_runner(model, example_input, after_run)
        _warm_up([run], settings)
        best = run.summarize(_measure_adaptive(run, settings))
        for _ in range(settings.max_remeasures):
            if best.cv <= settings.cv_threshold:
                break
            again = run.summarize(_measure_adaptive(run, settings))
            if again.cv < best.cv:
                best = again
    return best


def time_interleaved(
    candidate: nn.Module,
    reference: nn.Module,
    example_input: torch.Tensor,
    settings: TimingSettings,
    after_run: Callable[[], None] | None = None,
) -> tuple[TimingStats, TimingStats, float]:
    """Time `candidate` and `reference` alternately; return both stats and their time ratio.

    The ratio is the median of per-pair ratios (candidate / reference), which cancels drift of
    the machine during the measurement. While its standard error is above
    `settings.ratio_error`, up to `max_remeasures` more rounds of pairs are timed, and every
    round's pairs count: the stats and the ratio are over all of them. `after_run` is called
    after every run of either model, warm-up included, outside the timed part.
    """
    candidate_ns: list[int] = []
    reference_ns: list[int] = []
    with _timing_context([candidate, reference], settings.threads):
        run_candidate = _timed_runner(candidate, example_input, after_run)
        run_reference = _timed_runner(reference, example_input, after_run)
        _warm_up([run_candidate, run_reference], settings)
        for _ in range(1 + settings.max_remeasures):
            _measure_pairs(run_candidate, run_reference, settings, candidate_ns, reference_ns)
            if ratio_standard_error(candidate_ns, reference_ns) <= settings.ratio_error:
                break
    ratios = np.asarray(candidate_ns, dtype=np.float64) / np.asarray(reference_ns, dtype=np.float64)
    return (
        run_candidate.summarize(candidate_ns),
        run_reference.summarize(reference_ns),
        float(np.median(ratios)),
    )


def ratio_standard_error(candidate_ns: Sequence[int], reference_ns: Sequence[int]) -> float:
    """Relative standard error of the median per-pair ratio: 1.2533 x robust sd / sqrt(n).

    The robust sd is the ratios' IQR / 1.349; the median's standard error is 1.2533 times the
    mean's for normally distributed samples.
    """
    ratios = np.asarray(candidate_ns, dtype=np.float64) / np.asarray(reference_ns, dtype=np.float64)
    if len(ratios) < 2:
        return float("inf")
    p25, median, p75 = np.percentile(ratios, [25, 50, 75])
    if median <= 0:
        return float("inf")
    return float(1.2533 * (p75 - p25) / _IQR_PER_SIGMA / median / np.sqrt(len(ratios)))


@contextmanager
def _timing_context(models: Sequence[nn.Module], threads: int) -> Iterator[None]:
    """Inference mode, eval mode, a fixed thread count, a steady allocator and no garbage
    collection; the thread count, modes and collector are restored after.

    A full collection in a process that imported torch walks some 170,000 objects, a pause
    longer than many models' runs, so the collector is off while timing, as in `timeit`.
    """
    steady_allocator()
    previous_threads = torch.get_num_threads()
    was_training = [model.training for model in models]
    collecting = gc.isenabled()
    torch.set_num_threads(threads)
    gc.disable()
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        if collecting:
            gc.enable()
        torch.set_num_threads(previous_threads)
        for model, training in zip(models, was_training, strict=True):
            model.train(training)


class _TimedRunner:
    """Runs the model once per call and returns its wall time in ns.

    With `synchronize` (a GPU's), the clock runs until the device has finished the run's work:
    kernels launch asynchronously, and without it the clock would measure only the launch. The
    host's part, the call's own time, is kept in `launches_ns`. `after_run`, where given, is
    called after each run, once its time is taken.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        synchronize: Callable[[], None] | None = None,
        after_run: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.example_input = example_input
        self.synchronize = synchronize
        self.after_run = after_run
        self.launches_ns: list[int] = []

    def __call__(self) -> int:
        duration_ns = self._timed()
        if self.after_run is not None:
            self.after_run()
        return duration_ns

    def _timed(self) -> int:
        if self.synchronize is None:
            start = time.perf_counter_ns()
            self.model(self.example_input)
            return time.perf_counter_ns() - start
        self.synchronize()
        start = time.perf_counter_ns()
        self.model(self.example_input)
        launched = time.perf_counter_ns()
        self.synchronize()
        end = time.perf_counter_ns()
        self.launches_ns.append(launched - start)
        return end - start

    def summarize(self, durations_ns: Sequence[int]) -> TimingStats:
        """`summarize` of the last len(durations_ns) runs, with their launch times."""
        launches = self.launches_ns[-len(durations_ns) :] if self.launches_ns else None
        return summarize(durations_ns, launches)


def _timed_runner(
    model: nn.Module, example_input: torch.Tensor, after_run: Callable[[], None] | None
) -> _TimedRunner:
    if example_input.is_cuda:
        device = example_input.device
        return _TimedRunner(model, example_input, lambda: torch.cuda.synchronize(device), after_run)
    return _TimedRunner(model, example_input, after_run=after_run)


class RunCounter:
    """An `after_run` that counts runs and hands the count to `report` once `every_s` have
    passed since it last did (at the first run when `every_s` is 0): a report per run would
    cost a fast model's timing more than its runs."""

    def __init__(self, report: Callable[[int], None], every_s: float) -> None:
        self.report = report
        self.every_s = every_s
        self.runs = 0
        self._reported_at = time.monotonic()

    def __call__(self) -> None:
        self.runs += 1
        now = time.monotonic()
        if now - self._reported_at >= self.every_s:
            self._reported_at = now
            self.report(self.runs)


class RunsReport(Protocol):
    """Told, every `every_s` while a model is timed, the runs timed so far (`runs`), the
    fewest the timing takes (`planned`, see planned_runs) and the seconds since it started."""

    every_s: float

    def __call__(self, runs: int, planned: int, elapsed_s: float) -> None: ...


def planned_runs(settings: TimingSettings, interleaved: bool) -> int:
    """The fewest runs a timing takes: its warm-up and one round of `min_runs`, of each model
    when `interleaved`. More where the time minimum needs them or a noisy round is timed
    again."""
    return (settings.warmup_runs + settings.min_runs) * (2 if interleaved else 1)


def _warm_up(runs: Sequence[Callable[[], int]], settings: TimingSettings) -> None:
    """Run each model until both the warm-up count and the warm-up time are reached."""
    start = time.perf_counter()
    count = 0
    while count < settings.warmup_runs or time.perf_counter() - start < settings.warmup_s:
        for run in runs:
            run()
        count += 1


def _measure_adaptive(run: Callable[[], int], settings: TimingSettings) -> list[int]:
    durations: list[int] = []
    start = time.perf_counter()
    while len(durations) < settings.max_runs and (
        len(durations) < settings.min_runs or time.perf_counter() - start < settings.min_time_s
    ):
        durations.append(run())
    return durations


def _measure_pairs(
    run_candidate: Callable[[], int],
    run_reference: Callable[[], int],
    settings: TimingSettings,
    candidate_ns: list[int],
    reference_ns: list[int],
) -> None:
    """One round of pairs, appended to the lists: `min_runs` pairs and `min_time_s` at least."""
    start = time.perf_counter()
    count = 0
    while count < settings.max_runs and (
        count < settings.min_runs or time.perf_counter() - start < settings.min_time_s
    ):
        # Alternating which model goes first cancels any advantage of running second (warm
        # caches, frequency ramp-up).
        if len(candidate_ns) % 2 == 0:
            candidate_ns.append(run_candidate())
            reference_ns.append(run_reference())
        else:
            reference_ns.append(run_reference())
            candidate_ns.append(run_candidate())
        count += 1
