"""Pruning moves: distinct ways to choose which channels a child removes from its parent.

A move plus an amount (a fraction in [0, 1] of the removable channels in the move's scope)
gives a removal plan: for each coupled group, the indices of the channels to remove. Within a
group the least important channels always go first; moves differ in how many each group gives.
A ranked move (all but `uniform`) takes at most `max_cut` of any group's channels in one step:
a group cut to a few channels at once is a bottleneck that a short fine-tune cannot repair,
and its child would be scored at chance.

- `global`: rank the channels of all groups together by importance (normalised per group).
- `latency`: rank by importance lost per ms saved, ms estimated from the job's measurements.
- `focused`: like `global`, but only inside one region (a stage, a block).
- `uniform`: the same fraction of every group. It is the `uniform` baseline's only move, and
  one of the tree's: a chain of uniform steps is always among Archtree's candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from search.latency_estimate import LatencyEstimate
from search.pruning import ChannelGroup, PrunableModel, keep_rounded, least_important


@dataclass(frozen=True)
class Move:
    kind: str
    region: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.region}" if self.region else self.kind

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "region": self.region}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Move:
        return cls(kind=data["kind"], region=data.get("region"))

    @classmethod
    def from_label(cls, label: str) -> Move:
        kind, _, region = label.partition(":")
        return cls(kind=kind, region=region or None)


RemovalPlan = dict[str, list[int]]


def scope(move: Move, pruner: PrunableModel) -> list[ChannelGroup]:
    if move.kind == "focused":
        return [g for g in pruner.groups if g.region == move.region]
    return list(pruner.groups)


def removal_plan(
    move: Move,
    pruner: PrunableModel,
    importance: dict[str, np.ndarray],
    fraction: float,
    estimate: LatencyEstimate | None = None,
    max_cut: float = 1.0,
) -> RemovalPlan:
    """Channels to remove for `move` at `fraction` of the removable channels in its scope."""
    groups = [g for g in scope(move, pruner) if g.removable > 0]
    fraction = float(np.clip(fraction, 0.0, 1.0))
    if not groups or fraction == 0.0:
        return {}
    if move.kind == "uniform":
        counts = {g.name: int(round(fraction * g.removable)) for g in groups}
    else:
        counts = _ranked_counts(move, groups, importance, fraction, estimate, max_cut)
    plan: RemovalPlan = {}
    for group in groups:
        round_to = math.lcm(pruner.round_to, group.multiple)
        count = keep_rounded(group.size, counts.get(group.name, 0), round_to, group.min_size)
        if count > 0:
            plan[group.name] = least_important(importance[group.name], count, group.multiple)
    return plan


def _ranked_counts(
    move: Move,
    groups: list[ChannelGroup],
    importance: dict[str, np.ndarray],
    fraction: float,
    estimate: LatencyEstimate | None,
    max_cut: float = 1.0,
) -> dict[str, int]:
    """How many channels each group gives when the whole scope is ranked together."""
    keys, owners = [], []
    for index, group in enumerate(groups):
        # Only a group's least important `removable` channels, and at most `max_cut` of its
        # channels, are candidates at all.
        limit = min(group.removable, int(max_cut * group.size))
        candidates = np.sort(importance[group.name])[:limit]
        if move.kind == "latency":
            ms_per_channel = (
                estimate.ms_per_channel(group) if estimate is not None else group.macs_per_channel
            )
            candidates = candidates / max(ms_per_channel, 1e-12)
        keys.append(candidates)
        owners.append(np.full(len(candidates), index))
    all_keys, all_owners = np.concatenate(keys), np.concatenate(owners)
    total = int(round(fraction * len(all_keys)))
    chosen = all_owners[np.argsort(all_keys, kind="stable")[:total]]
    counts = np.bincount(chosen, minlength=len(groups))
    return {group.name: int(counts[i]) for i, group in enumerate(groups)}


def plan_macs_saved(pruner: PrunableModel, plan: RemovalPlan) -> float:
    return sum(
        len(idx) * pruner.groups_by_name[name].macs_per_channel for name, idx in plan.items()
    )


def predicted_ms_saved(
    pruner: PrunableModel, plan: RemovalPlan, estimate: LatencyEstimate
) -> float:
    return sum(
        len(idx) * estimate.ms_per_channel(pruner.groups_by_name[name])
        for name, idx in plan.items()
    )


def importance_lost(plan: RemovalPlan, importance: dict[str, np.ndarray]) -> float:
    return float(sum(importance[name][idx].sum() for name, idx in plan.items()))


def candidate_moves(
    pruner: PrunableModel,
    importance: dict[str, np.ndarray],
    estimate: LatencyEstimate,
    kinds: tuple[str, ...],
    branching: int,
    needed_ms: float = 0.0,
    probe_fraction: float = 0.3,
    max_cut: float = 1.0,
) -> list[Move]:
    """Up to `branching` distinct moves for a node, in the order of `kinds`.

    `focused` stands for one move per region, regions ordered by the estimated ms saved per
    importance lost when `probe_fraction` of their channels go. A region that is estimated to
    save well under `needed_ms` even at its minimum width is left out: its bisection would only
    spend measurements to find it cannot reach the target.
    """
    moves: list[Move] = []
    for kind in kinds:
        if len(moves) >= branching:
            break  # ranking the regions costs removal plans; skip it when no room is left
        if kind == "focused":
            moves.extend(
                _focused_moves(pruner, importance, estimate, needed_ms, probe_fraction, max_cut)
            )
        else:
            moves.append(Move(kind))
    return moves[:branching]


def _focused_moves(
    pruner: PrunableModel,
    importance: dict[str, np.ndarray],
    estimate: LatencyEstimate,
    needed_ms: float,
    probe_fraction: float,
    max_cut: float,
) -> list[Move]:
    ratios = []
    for region in pruner.regions:
        move = Move("focused", region)
        plan = removal_plan(move, pruner, importance, probe_fraction, estimate, max_cut)
        if not plan:
            continue
        whole = removal_plan(move, pruner, importance, 1.0, estimate, max_cut)
        most = predicted_ms_saved(pruner, whole, estimate)
        if most < 0.8 * needed_ms:
            continue
        saved = predicted_ms_saved(pruner, plan, estimate)
        lost = importance_lost(plan, importance)
        ratios.append((saved / max(lost, 1e-12), region))
    ratios.sort(key=lambda item: (-item[0], item[1]))
    return [Move("focused", region) for _, region in ratios]
