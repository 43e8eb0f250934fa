"""Filling the slack: give channels back to an answer that landed well under its target.

A convolution's latency jumps with its width (kernels compute in blocks of channels), and a
move sizes every group of its scope at once, so the last step of a path can land far under
its target: the next fraction up crosses a step in several groups together and is over it.
Given back group by group, a block of channels in each, the widths in between are found
by measuring. The widenings are ordered by importance given back per predicted ms; the
longest run of them that stays under the target is found by bisection on its length, so a
model with many groups needs few probes, and the ones after it are then tried alone, until
the answer is within `tolerance` of the target or the probes are spent. While the answer is
still well under, another round gives each group one more block (`fill_in_rounds`).

Pure algorithm: the caller builds and measures the candidates (`measure` takes the removal
counts per group of the parent and returns a latency in ms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np

RemovalCounts = dict[str, int]


@dataclass(frozen=True)
class Widening:
    """One group given back channels: from `removed` removed to `removed_after`."""

    group: str
    removed: int
    removed_after: int
    value: float  # importance given back per predicted ms it costs


@dataclass
class FillResult:
    """Where filling started, the counts and ms after each kept probe (`reached`), and every
    probe as (groups widened together, measured ms, kept), in order."""

    start: tuple[RemovalCounts, float]
    reached: list[tuple[RemovalCounts, float]] = field(default_factory=list)
    probes: list[tuple[list[str], float, bool]] = field(default_factory=list)

    @property
    def counts(self) -> RemovalCounts:
        """The removal counts reached: the start's when no widening fit."""
        return (self.reached[-1] if self.reached else self.start)[0]

    @property
    def latency_ms(self) -> float:
        return (self.reached[-1] if self.reached else self.start)[1]

    @property
    def too_costly(self) -> set[str]:
        """The groups whose widening, tried alone, measured over the target."""
        return {groups[0] for groups, _, kept in self.probes if len(groups) == 1 and not kept}

    @property
    def widened(self) -> list[str]:
        """The groups given channels back, each once, in the order first widened."""
        return list(
            dict.fromkeys(group for groups, _, kept in self.probes if kept for group in groups)
        )


def widenings(
    sizes: Mapping[str, int],
    removed: Mapping[str, int],
    importance: Mapping[str, np.ndarray],
    ms_per_channel: Mapping[str, float],
    block: int,
) -> list[Widening]:
    """For each group that lost channels, its width raised to the next multiple of `block`
    (by at most what it lost), most importance given back per predicted ms first.

    `importance` is the parent's, per channel; a group gives back its most important removed
    channels first, as it removed its least important first."""
    steps = []
    for name, count in removed.items():
        if count <= 0:
            continue
        keep = sizes[name] - count
        wider = (keep // block + 1) * block if block > 1 else keep + 1
        removed_after = max(0, sizes[name] - wider)
        order = np.sort(importance[name])
        given_back = float(order[removed_after:count].sum())
        cost = (count - removed_after) * ms_per_channel.get(name, 0.0)
        value = given_back / cost if cost > 0 else math.inf
        steps.append(Widening(name, count, removed_after, value))
    return sorted(steps, key=lambda step: -step.value)


def fill(
    removed: Mapping[str, int],
    latency_ms: float,
    steps: list[Widening],
    measure: Callable[[RemovalCounts], float],
    target_ms: float,
    *,
    tolerance: float,
    max_probes: int,
) -> FillResult:
    """Give back the longest run of `steps`, in order, that measures at or under `target_ms`,
    found by bisection on its length (more groups widened cost more, give or take a latency
    step), then try the steps after the one that broke it one at a time. Stops once within
    `tolerance` under the target or after `max_probes` measurements. Returns the counts
    reached (those given when no widening fits) and their latency."""
    result = FillResult(start=(dict(removed), latency_ms))

    def searching() -> bool:
        return len(result.probes) < max_probes and result.latency_ms < target_ms * (1 - tolerance)

    def probe(widened: list[Widening]) -> bool:
        trial = {**result.counts, **{step.group: step.removed_after for step in widened}}
        trial_ms = measure(trial)
        kept = trial_ms <= target_ms
        result.probes.append(([step.group for step in widened], trial_ms, kept))
        if kept:
            result.reached.append((trial, trial_ms))
        return kept

    # The first `low` steps are given back; `high` or more are known to be over the target.
    low, high = 0, len(steps) + 1
    while high - low > 1 and searching():
        length = len(steps) if high > len(steps) else (low + high) // 2
        if probe(steps[low:length]):
            low = length
        else:
            high = length
    for step in steps[high:]:
        if not searching():
            break
        probe([step])
    return result


def fill_in_rounds(
    removed: Mapping[str, int],
    latency_ms: float,
    steps_for: Callable[[RemovalCounts], list[Widening]],
    measure: Callable[[RemovalCounts], float],
    target_ms: float,
    *,
    tolerance: float,
    max_probes: int,
    skip: frozenset[str] = frozenset(),
) -> FillResult:
    """`fill` round after round: each round gives groups one more block (`steps_for` the
    counts reached so far), while the last round widened something, the answer is still more
    than `tolerance` under the target and probes remain. One block per group falls short when
    a move cut several blocks off each group, as a uniform step deep in a tree does. A group
    whose block, tried alone, measured over the target is not tried again: on a wider model
    its next block costs no less; nor are the groups in `skip`, known to be so already."""
    result = FillResult(start=(dict(removed), latency_ms))
    while len(result.probes) < max_probes and result.latency_ms < target_ms * (1 - tolerance):
        left_out = skip | result.too_costly
        steps = [step for step in steps_for(result.counts) if step.group not in left_out]
        if not steps:
            break
        round_result = fill(
            result.counts,
            result.latency_ms,
            steps,
            measure,
            target_ms,
            tolerance=tolerance,
            max_probes=max_probes - len(result.probes),
        )
        result.probes += round_result.probes
        if not round_result.reached:
            break
        result.reached += round_result.reached
    return result


def exchanges(
    widths: Mapping[str, int],
    over: list[tuple[Mapping[str, int], float]],
    sizes: Mapping[str, int],
    min_sizes: Mapping[str, int],
    importance: Mapping[str, np.ndarray],
    ms_per_channel: Mapping[str, float],
    block: int,
    target_ms: float,
    preferred: Collection[str] = (),
) -> list[dict[str, int]]:
    """Widths to try when every widening alone measured over the target: each of those
    widenings (`over`: widths and measured ms; a widening is one group wider than `widths`,
    none narrower) paired with a block taken off another group, so that the answer crosses a
    latency step in one group and steps back in another. Each group is widened to the width
    it was measured at with the least overshoot (its ms over the target).

    The groups to narrow are ranked, for each widening: first the `preferred` (the groups
    the answer's last move sized together, where a trade is likeliest to pay), then the
    rest; within each, those predicted to save at least the overshoot, least importance
    lost per predicted ms saved first, then the others, most ms saved first. The trials go
    rank by rank: every widening with its first choice, the least overshoot first, then
    with its second, and so on. `sizes` and `importance` (per channel, ascending is least
    important) are one model's, at least as wide as `widths` in every group; a group keeps
    its most important channels."""
    ranked: list[tuple[str, int, list[_Narrowing]]] = []
    for wider, wider_ms in sorted(over, key=lambda item: item[1]):
        grown = [name for name in widths if wider.get(name, widths[name]) > widths[name]]
        shrunk = [name for name in widths if wider.get(name, widths[name]) < widths[name]]
        if len(grown) != 1 or shrunk or grown[0] in {group for group, _, _ in ranked}:
            continue
        widened = grown[0]
        narrowings = [
            narrowing
            for name, width in widths.items()
            if name != widened
            and (narrowing := _narrowing(name, width, sizes, min_sizes, importance,
                                         ms_per_channel, block))
        ]  # fmt: skip
        overshoot = max(wider_ms - target_ms, 0.0)
        narrowings.sort(key=partial(_narrowing_rank, overshoot, preferred))
        ranked.append((widened, wider[widened], narrowings))
    return [
        {**widths, widened: width, narrowings[rank].group: narrowings[rank].width}
        for rank in range(max((len(n) for _, _, n in ranked), default=0))
        for widened, width, narrowings in ranked
        if rank < len(narrowings)
    ]


@dataclass(frozen=True)
class _Narrowing:
    """A group narrowed by a block: the importance it loses and the ms it is predicted to save."""

    group: str
    width: int
    lost: float
    saved_ms: float


def _narrowing_rank(
    overshoot: float, preferred: Collection[str], option: _Narrowing
) -> tuple[bool, bool, float]:
    """Lowest first: preferred groups, then those predicted to save the overshoot, by least
    importance lost per ms saved; then those that fall short, most ms saved first."""
    saves_enough = option.saved_ms > 0 and option.saved_ms >= overshoot
    per_ms = option.lost / option.saved_ms if saves_enough else -option.saved_ms
    return option.group not in preferred, not saves_enough, per_ms


def _narrowing(
    name: str,
    width: int,
    sizes: Mapping[str, int],
    min_sizes: Mapping[str, int],
    importance: Mapping[str, np.ndarray],
    ms_per_channel: Mapping[str, float],
    block: int,
) -> _Narrowing | None:
    """The group cut to the multiple of `block` below `width` (None when at its minimum)."""
    narrower = max(min_sizes[name], (width - 1) // block * block)
    if narrower >= width:
        return None
    order = np.sort(importance[name])
    lost = float(order[sizes[name] - width : sizes[name] - narrower].sum())
    return _Narrowing(name, narrower, lost, (width - narrower) * ms_per_channel.get(name, 0.0))
