"""How much a move removes: a short bisection whose probes are real latency measurements.

We want the smallest fraction whose measured latency is at or under the target: removing
less keeps more accuracy. The search is warm-started from a linear estimate, brackets the
target between a fraction known to be too slow and one known to be fast enough, and stops
early once a feasible probe lands within `tolerance` under the target.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class AmountResult:
    """The chosen fraction (None when even the whole scope cannot reach the target)."""

    fraction: float | None
    latency_ms: float | None
    probes: list[tuple[float, float]] = field(default_factory=list)


def find_amount(
    measure: Callable[[float], float],
    target_ms: float,
    parent_ms: float,
    guess: float,
    *,
    max_probes: int = 5,
    tolerance: float = 0.03,
) -> AmountResult:
    """Bisect on measured latency for the smallest fraction meeting `target_ms`."""
    low, low_ms = 0.0, parent_ms  # too slow (or untouched)
    high: float | None = None
    high_ms: float | None = None
    probes: list[tuple[float, float]] = []
    fraction = min(max(guess, 0.02), 1.0)
    for _ in range(max_probes):
        latency = measure(fraction)
        probes.append((fraction, latency))
        if latency <= target_ms:
            if high is None or fraction < high:
                high, high_ms = fraction, latency
            if latency >= target_ms * (1.0 - tolerance):
                break
        else:
            low, low_ms = max(low, fraction), latency
            if fraction >= 1.0:
                break
        fraction = _next_probe(parent_ms, low, low_ms, high, high_ms, target_ms)
        if fraction is None:
            break
    return AmountResult(fraction=high, latency_ms=high_ms, probes=probes)


def _next_probe(
    parent_ms: float,
    low: float,
    low_ms: float,
    high: float | None,
    high_ms: float | None,
    target_ms: float,
) -> float | None:
    if high is None:
        if low >= 1.0:
            return None
        # Nothing fast enough yet: extrapolate the line through the parent and the slow probe,
        # overshooting a little, and always moving at least 0.1 further.
        saved = parent_ms - low_ms
        needed = parent_ms - target_ms
        extrapolated = low * needed / saved * 1.15 if saved > 0 else 1.0
        return min(1.0, max(extrapolated, low + 0.1))
    if high - low < 0.01:
        return None
    # Regula falsi between the bracket ends, kept away from them so the bracket shrinks.
    span = low_ms - high_ms if high_ms is not None else 0.0
    position = (low_ms - target_ms) / span if span > 0 else 0.5
    position = min(max(position, 0.25), 0.75)
    return low + position * (high - low)
