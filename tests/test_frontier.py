"""The frontier ranks children in Pareto layers of (latency, score), not by score alone."""

from __future__ import annotations

from search.arch_spec import ArchSpec
from search.frontier import dominates, pareto_layers, rank_children
from search.model_source import ModelRef
from search.tree import Node

BUDGET_MS = 3.0
SPEC = ArchSpec(model=ModelRef("builtin:vgg", 10, 1), input_shape=(1, 8, 8), layers={})


def node(node_id: str, latency_ms: float, score: float) -> Node:
    return Node(
        node_id,
        "n0",
        2,
        "global",
        SPEC,
        latency_ms,
        latency_ms / 10,
        score,
        latency_ms <= BUDGET_MS,
    )


# A depth of a search where some moves overshot their target (fast, lower scores) and others
# landed on a target further up (slow, higher scores), as latency steps of a CPU make happen.
CHILDREN = [
    node("ahead_good", 3.9, 0.772),
    node("ahead_fastest", 3.87, 0.746),
    node("ahead_worse", 3.88, 0.612),
    node("behind_1", 5.18, 0.806),
    node("behind_2", 5.42, 0.802),
    node("behind_best", 4.98, 0.826),
]


def test_a_child_faster_and_better_dominates_and_ties_do_not():
    fast_good, slow_bad = node("a", 4.0, 0.9), node("b", 5.0, 0.8)
    assert dominates(fast_good, slow_bad, BUDGET_MS)
    assert not dominates(slow_bad, fast_good, BUDGET_MS)
    assert not dominates(fast_good, node("c", 4.0, 0.9), BUDGET_MS)
    # Faster but worse: neither dominates.
    assert not dominates(node("d", 3.5, 0.7), fast_good, BUDGET_MS)
    assert not dominates(fast_good, node("d", 3.5, 0.7), BUDGET_MS)


def test_under_the_budget_only_the_score_counts():
    under_fast, under_slow = node("a", 1.0, 0.80), node("b", 2.9, 0.85)
    assert dominates(under_slow, under_fast, BUDGET_MS)
    assert not dominates(under_fast, under_slow, BUDGET_MS)


def test_layers_keep_the_trade_off_and_score_order_alone_would_not():
    layers = pareto_layers(CHILDREN, BUDGET_MS)
    first = {n.id for n in layers[0]}
    assert first == {"ahead_fastest", "ahead_good", "behind_best"}
    assert sum(len(layer) for layer in layers) == len(CHILDREN)
    # Every child of a later layer is dominated by one of the layer before it.
    for before, after in zip(layers, layers[1:], strict=False):
        assert all(any(dominates(m, n, BUDGET_MS) for m in before) for n in after)

    ranked = [n.id for n in rank_children(CHILDREN, BUDGET_MS)]
    assert ranked[:3] == ["behind_best", "ahead_good", "ahead_fastest"]
    by_score = [n.id for n in sorted(CHILDREN, key=lambda n: -n.score)]
    assert set(by_score[:3]) == {"behind_best", "behind_1", "behind_2"}


def test_with_a_frontier_of_one_the_best_score_goes_on():
    for children in (CHILDREN, CHILDREN[::-1], CHILDREN[2:]):
        best = max(children, key=lambda n: n.score)
        assert rank_children(children, BUDGET_MS)[0].id == best.id


def test_only_the_best_child_under_budget_ranks_early():
    children = [
        node("under_poor", 2.0, 0.30),
        node("under_good", 2.9, 0.90),
        node("over_better", 3.5, 0.93),
        node("over_worse", 3.4, 0.85),
    ]
    ranked = [n.id for n in rank_children(children, BUDGET_MS)]
    assert ranked[:2] == ["over_better", "under_good"]
    assert ranked.index("under_poor") == 3
