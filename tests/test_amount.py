import pytest

from search.amount import find_amount


def linear_latency(parent_ms, slope):
    probes = []

    def measure(fraction):
        probes.append(fraction)
        return parent_ms - slope * fraction

    return measure, probes


def test_bisection_finds_the_smallest_fraction_meeting_the_target():
    measure, probes = linear_latency(10.0, 8.0)  # 10 ms at 0, 2 ms at 1
    result = find_amount(measure, 6.0, 10.0, guess=0.2, max_probes=6, tolerance=0.03)
    assert result.fraction is not None
    assert result.latency_ms <= 6.0
    assert result.latency_ms >= 6.0 * 0.97
    assert result.fraction == pytest.approx(0.5, abs=0.02)
    assert len(probes) <= 6


def test_a_good_warm_start_needs_one_probe():
    measure, probes = linear_latency(10.0, 8.0)
    result = find_amount(measure, 6.0, 10.0, guess=0.505, tolerance=0.03)
    assert len(probes) == 1
    assert result.fraction == 0.505


def test_unreachable_target_gives_no_fraction():
    measure, probes = linear_latency(10.0, 2.0)  # never below 8 ms
    result = find_amount(measure, 5.0, 10.0, guess=0.5, max_probes=5)
    assert result.fraction is None
    assert probes[-1] == 1.0


def test_step_shaped_latency_still_lands_under_target():
    # Latency that moves in steps (as real kernels do when channel counts cross thresholds).
    def measure(fraction):
        return 10.0 - 4.0 * int(fraction * 4) / 4 * 2

    result = find_amount(measure, 7.0, 10.0, guess=0.1, max_probes=6)
    assert result.fraction is not None
    assert measure(result.fraction) <= 7.0
