"""Latency budgets: an absolute time (`8ms`) or a share of the unpruned model's latency (`60%`)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from search.errors import ArchtreeError

# The largest budget in milliseconds: over a quarter of an hour for one answer, far beyond
# any model timed here (a budget above the unpruned latency asks for no pruning anyway).
MAX_BUDGET_MS = 1_000_000

# A sign is read, so that a negative budget is told to be above zero rather than unread.
_PATTERN = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|%)\s*$")


@dataclass(frozen=True)
class Budget:
    value: float
    unit: str  # "ms" or "%"

    def resolve(self, baseline_ms: float) -> float:
        """The budget in ms, given the unpruned model's latency on the device."""
        return self.value if self.unit == "ms" else baseline_ms * self.value / 100.0

    def __str__(self) -> str:
        return f"{self.value:g}{self.unit}"


def ms_text(latency_ms: float) -> str:
    """A latency in milliseconds to three decimals, or three significant digits below 0.1 ms,
    where three decimals would round it to zero."""
    return f"{latency_ms:.3f}" if latency_ms >= 0.1 else f"{latency_ms:.3g}"


def parse_budget(text: str) -> Budget:
    match = _PATTERN.match(str(text))
    if not match:
        raise ArchtreeError(
            f"cannot read the budget {text!r}: give milliseconds like 8ms or a share of the "
            "unpruned model's latency like 60%."
        )
    value, unit = float(match.group(1)), match.group(2)
    if not math.isfinite(value) or (unit == "ms" and value > MAX_BUDGET_MS):
        raise ArchtreeError(
            f"the budget {text!r} is too large: give at most {MAX_BUDGET_MS:,} ms, like 8ms."
        )
    if value <= 0:
        raise ArchtreeError(f"the budget must be above zero, got {text!r}.")
    if unit == "%" and value >= 100:
        raise ArchtreeError(
            f"a budget of {text} does not ask for any pruning: give a share below 100%, like 60%."
        )
    return Budget(value=value, unit=unit)
