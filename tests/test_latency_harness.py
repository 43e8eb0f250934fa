"""Timing harness: statistics, adaptive run count, interleaving, restored state."""

from __future__ import annotations

import gc
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from latency.allocator import steady_allocator
from latency.harness import (
    RunCounter,
    TimingSettings,
    planned_runs,
    ratio_standard_error,
    summarize,
    time_interleaved,
    time_model,
)

FAST = TimingSettings(warmup_runs=3, warmup_s=0.0, min_runs=10, min_time_s=0.02, max_remeasures=0)


def mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)))


class CallLog(nn.Module):
    """Records its name and the torch thread count at every call."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name = name
        self.log = log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, torch.get_num_threads()))
        return x * 2


class Failing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def test_summarize_statistics() -> None:
    stats = summarize([1_000_000 * v for v in range(1, 101)])
    assert stats.n == 100
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1)
    assert stats.iqr_ms == pytest.approx(49.5)
    assert stats.cv == pytest.approx(49.5 / 1.349 / 50.5)


def test_time_model_stats_are_consistent() -> None:
    stats = time_model(mlp(64, 2), torch.randn(1, 64), FAST)
    assert stats.n >= FAST.min_runs
    assert 0 < stats.median_ms <= stats.p90_ms
    assert stats.iqr_ms >= 0 and stats.cv >= 0 and stats.mean_ms > 0


def test_run_count_grows_with_min_time() -> None:
    model, x = mlp(64, 2), torch.randn(1, 64)
    short = time_model(model, x, TimingSettings(warmup_runs=3, min_runs=5, min_time_s=0.01))
    long = time_model(model, x, TimingSettings(warmup_runs=3, min_runs=5, min_time_s=0.1))
    assert long.n >= 2 * short.n


def test_max_runs_stops_a_long_measurement() -> None:
    settings = TimingSettings(warmup_runs=1, warmup_s=0.0, min_runs=5, max_runs=20, min_time_s=60)
    assert time_model(mlp(16, 1), torch.randn(1, 16), settings).n == 20


def test_high_cv_triggers_remeasures() -> None:
    log: list[tuple[str, int]] = []
    exact = TimingSettings(
        warmup_runs=2, warmup_s=0.0, min_runs=10, max_runs=10, min_time_s=0, cv_threshold=10.0
    )
    time_model(CallLog("m", log), torch.ones(1), exact)
    assert len(log) == 2 + 10
    log.clear()
    # A zero threshold is never met, so every allowed re-measure happens.
    never_met = replace(exact, cv_threshold=0.0, max_remeasures=2)
    stats = time_model(CallLog("m", log), torch.ones(1), never_met)
    assert len(log) == 2 + 3 * 10
    assert stats.n == 10


def test_threads_fixed_during_timing_and_restored() -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log: list[tuple[str, int]] = []
        time_model(CallLog("m", log), torch.ones(1), FAST)
        assert {threads for _, threads in log} == {1}
        assert torch.get_num_threads() == 2
        model = Failing().train()
        with pytest.raises(RuntimeError, match="boom"):
            time_model(model, torch.ones(1), FAST)
        assert torch.get_num_threads() == 2
        assert model.training
    finally:
        torch.set_num_threads(previous)


def test_eval_mode_during_timing_and_training_mode_restored() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)).train()
    seen: list[bool] = []
    model.register_forward_hook(lambda module, args, out: seen.append(module.training))
    time_model(model, torch.randn(1, 8), FAST)
    assert seen and not any(seen)
    assert model.training


def test_garbage_collector_off_during_timing_and_restored() -> None:
    model = nn.Linear(4, 4)
    seen: list[bool] = []
    model.register_forward_hook(lambda *_: seen.append(gc.isenabled()))
    assert gc.isenabled()
    time_interleaved(model, model, torch.randn(1, 4), FAST)
    assert seen and not any(seen)
    assert gc.isenabled()
    gc.disable()
    try:
        time_model(model, torch.randn(1, 4), FAST)
        assert not gc.isenabled()  # a caller that had it off keeps it off
    finally:
        gc.enable()
    with pytest.raises(RuntimeError, match="boom"):
        time_model(Failing(), torch.ones(1), FAST)
    assert gc.isenabled()


def test_interleaving_alternates_which_model_goes_first() -> None:
    log: list[tuple[str, int]] = []
    settings = TimingSettings(
        warmup_runs=2, warmup_s=0.0, min_runs=6, max_runs=6, min_time_s=0, max_remeasures=0
    )
    candidate_stats, reference_stats, _ = time_interleaved(
        CallLog("c", log), CallLog("r", log), torch.ones(1), settings
    )
    order = "".join(name for name, _ in log)
    assert order == "crcr" + "crrc" * 3
    assert candidate_stats.n == reference_stats.n == 6


def test_interleaved_ratio_orders_models_by_work() -> None:
    x = torch.randn(8, 256)
    small, large = mlp(256, 1), mlp(256, 8)
    large_stats, small_stats, ratio = time_interleaved(large, small, x, FAST)
    assert ratio > 3
    assert large_stats.median_ms > small_stats.median_ms
    _, _, inverse = time_interleaved(small, large, x, FAST)
    assert inverse < 1 / 3


def test_same_model_interleaved_has_ratio_near_one() -> None:
    model = mlp(128, 2)
    _, _, ratio = time_interleaved(model, model, torch.randn(4, 128), FAST)
    assert 0.5 < ratio < 2


def test_ratio_standard_error_shrinks_with_pairs_and_vanishes_without_noise() -> None:
    assert ratio_standard_error([2, 2, 2, 2], [1, 1, 1, 1]) == 0.0
    assert ratio_standard_error([2], [1]) == float("inf")
    noisy = [100, 120, 90, 110, 105, 95, 115, 85]
    reference = [100] * len(noisy)
    few = ratio_standard_error(noisy, reference)
    assert few > 0
    # Four times the pairs with the same spread: half the standard error.
    assert ratio_standard_error(noisy * 4, reference * 4) == pytest.approx(few / 2)


def test_imprecise_ratio_pools_more_rounds_of_pairs() -> None:
    x = torch.randn(4, 64)
    model = mlp(64, 2)
    rounds = TimingSettings(
        warmup_runs=1, warmup_s=0.0, min_runs=10, max_runs=10, min_time_s=0, max_remeasures=2
    )
    # An unreachable precision: all three rounds are timed, and all of them count.
    candidate, reference, _ = time_interleaved(model, model, x, replace(rounds, ratio_error=0.0))
    assert candidate.n == reference.n == 30
    # Any precision is enough: one round.
    candidate, _, _ = time_interleaved(model, model, x, replace(rounds, ratio_error=float("inf")))
    assert candidate.n == 10


def test_scaled_settings_ask_for_more() -> None:
    confirm = FAST.scaled()
    assert confirm.min_runs == 4 * FAST.min_runs
    assert confirm.min_time_s == pytest.approx(4 * FAST.min_time_s)
    assert confirm.max_runs >= confirm.min_runs
    assert TimingSettings(min_runs=600).scaled().max_runs >= 2400


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        TimingSettings(min_runs=10, max_runs=5)
    with pytest.raises(ValueError):
        TimingSettings(threads=0)
    with pytest.raises(ValueError):
        TimingSettings(ratio_error=-0.1)


_PAGE_FAULTS_PER_RUN = """
import resource, sys
import torch
from torch import nn
from latency.harness import TimingSettings, time_model
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
x = torch.randn(4, 3, 64, 64)
if sys.argv[1] == "harness":
    time_model(model, x, TimingSettings(warmup_runs=2, warmup_s=0.0, min_runs=3, min_time_s=0.0))
with torch.inference_mode():
    for _ in range(3):
        model(x)
    per_run = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            model(x)
        per_run.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(sorted(per_run)[3])
"""


def _page_faults_per_run(mode: str) -> float:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _PAGE_FAULTS_PER_RUN, mode],
        cwd=root,
        env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def test_timing_reuses_activation_memory_between_runs() -> None:
    """In a fresh process glibc maps a model's activations afresh at every run, a page fault
    per 4 KiB; once the harness has timed, runs reuse the memory and barely fault."""
    if steady_allocator() != "glibc-steady":
        pytest.skip("the C library is not glibc: its allocator is left as it is")
    # 4 x 32 x 64 x 64 floats: 2 MiB of activations per layer, 512 pages. The median over
    # seven blocks of runs, so that one stray fault burst does not decide.
    assert _page_faults_per_run("plain") > 50
    assert _page_faults_per_run("harness") < 5


def test_a_device_timing_tells_the_hosts_launch_time_from_the_devices_work():
    from latency.harness import _TimedRunner
    from search.notes import launch_bound

    x = torch.randn(16, 256)
    host, device = mlp(256, 1), mlp(256, 8)
    # A device whose queued work is the deep MLP: synchronizing waits for it, as a GPU's does.
    busy = _TimedRunner(host, x, synchronize=lambda: device(x))
    idle = _TimedRunner(host, x, synchronize=lambda: None)
    with torch.inference_mode():
        busy_stats = busy.summarize([busy() for _ in range(30)])
        idle_stats = idle.summarize([idle() for _ in range(30)])
    assert busy_stats.launch_ms is not None and idle_stats.launch_ms is not None
    # Waiting on the device's work is timed, but is not the host's launch.
    assert busy_stats.launch_ms < 0.5 * busy_stats.median_ms
    assert not launch_bound(busy_stats)
    # With nothing queued, the launch is the whole run: the host sets the time.
    assert idle_stats.launch_ms <= idle_stats.median_ms
    assert launch_bound(idle_stats)


def test_a_cpu_timing_has_no_launch_time():
    stats = time_model(mlp(32, 2), torch.randn(4, 32), FAST)
    assert stats.launch_ms is None
    assert "launch_ms" in stats.to_dict()


EXACT = TimingSettings(warmup_runs=2, warmup_s=0.0, min_runs=3, min_time_s=0.0, max_remeasures=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_after_run_is_called_after_every_run_and_the_planned_runs_count_them(interleaved):
    log: list[tuple[str, int]] = []
    reports: list[int] = []
    counter = RunCounter(reports.append, every_s=0.0)
    calls_before = []

    def after_run() -> None:
        calls_before.append(len(log))  # called once the run it follows has been made
        counter()

    if interleaved:
        time_interleaved(CallLog("c", log), CallLog("r", log), torch.ones(1), EXACT, after_run)
    else:
        time_model(CallLog("m", log), torch.ones(1), EXACT, after_run)
    assert calls_before == list(range(1, len(log) + 1))
    assert counter.runs == len(log) == planned_runs(EXACT, interleaved) == 5 * (1 + interleaved)
    assert reports == list(range(1, len(log) + 1))


def test_a_run_counter_reports_no_more_often_than_asked():
    reports: list[int] = []
    counter = RunCounter(reports.append, every_s=3600.0)
    time_model(CallLog("m", []), torch.ones(1), EXACT, counter)
    assert counter.runs == 5 and reports == []
