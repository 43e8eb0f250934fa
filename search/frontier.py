"""Which children of a depth go on to the next: the frontier, ranked by Pareto layers.

Children of one depth sit at different latencies: a move that overshot its target (a latency
step of the device) is further along than one that landed on it, and after a short fine-tune
the less pruned child nearly always scores higher. Ranking by score alone keeps the laggards,
which must then cut harder at the next depth, where short fine-tunes repair the least.

So children are ranked in layers of (latency, score): first the children that no other child
beats on both counts (as fast or faster, and as good or better), best score first; then the
layer found once those are set aside; and so on. Under the budget, latency no longer matters:
a child there counts as at the budget, so only the best of those ranks early. With a frontier
of one (the greedy strategy) this is the best score, as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from search.tree import Node


def dominates(a: Node, b: Node, budget_ms: float) -> bool:
    """`a` is at least as fast (counting any latency under the budget as the budget) and at
    least as good as `b`, and better on one of the two."""
    a_ms, b_ms = max(a.latency_ms, budget_ms), max(b.latency_ms, budget_ms)
    return a_ms <= b_ms and a.score >= b.score and (a_ms < b_ms or a.score > b.score)


def pareto_layers(nodes: Iterable[Node], budget_ms: float) -> list[list[Node]]:
    """The nodes in layers: each layer holds those no remaining node dominates."""
    remaining = list(nodes)
    layers = []
    while remaining:
        layer = [n for n in remaining if not any(dominates(m, n, budget_ms) for m in remaining)]
        layers.append(layer)
        placed = {n.id for n in layer}
        remaining = [n for n in remaining if n.id not in placed]
    return layers


def rank_children(nodes: Iterable[Node], budget_ms: float) -> list[Node]:
    """Layer by layer; within a layer, best score first (then the faster, then by id)."""
    return [
        node
        for layer in pareto_layers(nodes, budget_ms)
        for node in sorted(layer, key=lambda n: (-n.score, n.latency_ms, n.id))
    ]
