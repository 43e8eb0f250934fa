"""The search tree: nodes (candidate sub-models), child tasks and the search state.

Everything here is plain data that round-trips through JSON, so the same state can live in
one process or in Redis between depths of a distributed job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from search.arch_spec import ArchSpec
from search.latency_estimate import Observation
from search.moves import Move
from search.settings import DEFAULT_CHANNEL_BLOCK


@dataclass
class Node:
    """One candidate sub-model. Its weights live in a node store under its id."""

    id: str
    parent: str | None
    depth: int
    move: str | None
    spec: ArchSpec
    latency_ms: float
    ratio: float
    score: float
    within_budget: bool
    fraction: float | None = None
    params: int = 0
    macs: float = 0.0
    # The multiple its channel groups were widened to after sizing (settings.widen_to), if any.
    widened_to: int | None = None
    # The answer it was widened from to fill the budget's slack (engine `_fill_slack`), if any.
    filled_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spec"] = self.spec.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Node:
        data = dict(data)
        data["spec"] = ArchSpec.from_dict(data["spec"])
        return cls(**data)

    def summary(self) -> dict[str, Any]:
        """The node as the report's tree lists it (widths instead of the full spec)."""
        return {
            "id": self.id,
            "parent": self.parent,
            "depth": self.depth,
            "move": self.move,
            "fraction": self.fraction,
            "widened_to": self.widened_to,
            "filled_from": self.filled_from,
            "latency_ms": self.latency_ms,
            "ratio": self.ratio,
            "score": self.score,
            "within_budget": self.within_budget,
            "params": self.params,
            "macs": self.macs,
            "arch_hash": self.spec.hash,
        }


@dataclass
class ChildTask:
    """Everything needed to evaluate one child, wherever it runs."""

    child_id: str
    parent: Node
    move: Move
    target_ms: float
    depth: int
    baseline_ms: float
    baseline_macs: float
    budget_ms: float
    observations: list[Observation] = field(default_factory=list)
    # The multiple a sized child's groups are tried widened to (SearchState.widen_to).
    widen_to: int = DEFAULT_CHANNEL_BLOCK

    def to_dict(self) -> dict[str, Any]:
        return {
            "child_id": self.child_id,
            "parent": self.parent.to_dict(),
            "move": self.move.to_dict(),
            "target_ms": self.target_ms,
            "depth": self.depth,
            "baseline_ms": self.baseline_ms,
            "baseline_macs": self.baseline_macs,
            "budget_ms": self.budget_ms,
            "observations": [o.to_dict() for o in self.observations],
            "widen_to": self.widen_to,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChildTask:
        return cls(
            child_id=data["child_id"],
            parent=Node.from_dict(data["parent"]),
            move=Move.from_dict(data["move"]),
            target_ms=data["target_ms"],
            depth=data["depth"],
            baseline_ms=data["baseline_ms"],
            baseline_macs=data["baseline_macs"],
            budget_ms=data["budget_ms"],
            observations=[Observation(**o) for o in data["observations"]],
            widen_to=data.get("widen_to", DEFAULT_CHANNEL_BLOCK),
        )


@dataclass
class ChildResult:
    """What evaluating a child produced: a node, or None when the move cannot reach its target."""

    child_id: str
    node: Node | None
    observations: list[Observation] = field(default_factory=list)
    measurements: int = 0
    cache_hits: int = 0
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "child_id": self.child_id,
            "node": self.node.to_dict() if self.node else None,
            "observations": [o.to_dict() for o in self.observations],
            "measurements": self.measurements,
            "cache_hits": self.cache_hits,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChildResult:
        return cls(
            child_id=data["child_id"],
            node=Node.from_dict(data["node"]) if data.get("node") else None,
            observations=[Observation(**o) for o in data.get("observations", [])],
            measurements=data.get("measurements", 0),
            cache_hits=data.get("cache_hits", 0),
            reason=data.get("reason"),
        )


def answer_rank(node: Node) -> tuple[float, float, str]:
    """Sort key of candidate answers: best score first; among equals, the one closest to the
    budget (the least pruned)."""
    return (-node.score, -node.latency_ms, node.id)


@dataclass
class SearchState:
    """The tree so far, the frontier to expand next, and the job's running tallies."""

    baseline_ms: float
    baseline_macs: float
    budget_ms: float
    step_ms: float
    root_id: str
    nodes: dict[str, Node] = field(default_factory=dict)
    frontier: list[str] = field(default_factory=list)
    depth: int = 0
    done: bool = False
    observations: list[Observation] = field(default_factory=list)
    candidates_evaluated: int = 0
    measurements: int = 0
    cache_hits: int = 0
    # Whether each architecture confirmed (by hash) had its first confirmation from the
    # latency cache, as the progress says.
    confirmed_cached: dict[str, bool] = field(default_factory=dict)
    next_id: int = 1
    # The multiple channel groups are widened to, once the device is known
    # (SearchSettings.widen_multiple); 0 or 1 when widening is off.
    widen_to: int = DEFAULT_CHANNEL_BLOCK
    # Whether the smallest reachable model's time went mostly to launching its kernels from
    # the host (a GPU waiting on the CPU; search.notes.launch_bound).
    launch_bound: bool = False

    @property
    def root(self) -> Node:
        return self.nodes[self.root_id]

    def ranked_within_budget(self) -> list[Node]:
        """The pruned nodes measured under budget, best score first."""
        feasible = [n for n in self.nodes.values() if n.within_budget and n.id != self.root_id]
        return sorted(feasible, key=answer_rank)

    def best_within_budget(self) -> Node | None:
        ranked = self.ranked_within_budget()
        return ranked[0] if ranked else None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("nodes", "observations")}
        data["nodes"] = {k: n.to_dict() for k, n in self.nodes.items()}
        data["observations"] = [o.to_dict() for o in self.observations]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchState:
        data = dict(data)
        data["nodes"] = {k: Node.from_dict(n) for k, n in data["nodes"].items()}
        data["observations"] = [Observation(**o) for o in data["observations"]]
        return cls(**data)
