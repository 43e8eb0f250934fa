import numpy as np
import pytest

from search.latency_estimate import LatencyEstimate, Observation
from search.moves import Move, candidate_moves, removal_plan, scope
from search.pruning import PrunableModel
from search.zoo import BUILTIN_MODELS


@pytest.fixture
def pruner(example_input):
    model = BUILTIN_MODELS["resnet"].constructor().eval()
    return PrunableModel(model, example_input)


def removed_counts(plan):
    return {name: len(idx) for name, idx in plan.items()}


def test_global_move_removes_the_least_important_channels_across_groups(pruner):
    importance = pruner.importance()
    plan = removal_plan(Move("global"), pruner, importance, 0.3)
    total_removable = sum(g.removable for g in pruner.groups)
    assert sum(removed_counts(plan).values()) == pytest.approx(0.3 * total_removable, abs=2)
    # Every removed channel is no more important than any kept candidate channel.
    removed = np.concatenate([importance[n][idx] for n, idx in plan.items()])
    kept = np.concatenate(
        [
            np.delete(np.sort(importance[g.name])[: g.removable], range(len(plan.get(g.name, []))))
            for g in pruner.groups
        ]
    )
    assert removed.max() <= kept.min() + 1e-9
    # Within a group, the removed channels are the least important ones.
    for name, indices in plan.items():
        order = np.argsort(importance[name], kind="stable")
        assert sorted(order[: len(indices)]) == indices


def test_removal_grows_with_fraction_and_respects_minimum_width(pruner):
    importance = pruner.importance()
    previous = -1
    for fraction in (0.0, 0.2, 0.5, 0.8, 1.0):
        plan = removal_plan(Move("global"), pruner, importance, fraction)
        total = sum(removed_counts(plan).values())
        assert total >= previous
        previous = total
        for group in pruner.groups:
            assert len(plan.get(group.name, [])) <= group.removable
    assert removal_plan(Move("global"), pruner, importance, 0.0) == {}


def test_latency_move_prefers_groups_whose_channels_cost_more_ms(pruner):
    importance = {g.name: np.ones(g.size) for g in pruner.groups}
    cheap, costly = "stem", "stage3"
    estimate = LatencyEstimate(
        1.0,
        1e6,
        [Observation(cheap, 1e6, 1e-6), Observation(costly, 1e3, 50.0)],
    )
    plan = removal_plan(Move("latency"), pruner, importance, 0.3, estimate)
    counts = removed_counts(plan)
    costly_share = sum(counts.get(g.name, 0) for g in pruner.groups if g.region == costly)
    cheap_share = sum(counts.get(g.name, 0) for g in pruner.groups if g.region == cheap)
    assert costly_share > 0
    assert cheap_share == 0
    # With equal importance everywhere, the global move spreads by rank order instead.
    global_counts = removed_counts(removal_plan(Move("global"), pruner, importance, 0.3))
    assert global_counts != counts


def test_focused_move_only_touches_its_region(pruner):
    importance = pruner.importance()
    for region in pruner.regions:
        move = Move("focused", region)
        plan = removal_plan(move, pruner, importance, 0.5)
        in_scope = {g.name for g in scope(move, pruner)}
        assert plan
        assert set(plan) <= in_scope


def test_uniform_move_takes_the_same_share_of_every_group(pruner):
    importance = pruner.importance()
    plan = removal_plan(Move("uniform"), pruner, importance, 0.5)
    for group in pruner.groups:
        assert len(plan[group.name]) == round(0.5 * group.removable)


def test_candidate_moves_are_distinct_and_bounded_by_branching(pruner):
    importance = pruner.importance()
    estimate = LatencyEstimate(1.0, 1e6)
    moves = candidate_moves(pruner, importance, estimate, ("global", "latency", "focused"), 4)
    assert len(moves) == 4
    assert len(set(moves)) == 4
    assert moves[0] == Move("global") and moves[1] == Move("latency")
    assert all(m.kind == "focused" and m.region in pruner.regions for m in moves[2:])
    assert len(candidate_moves(pruner, importance, estimate, ("global",), 4)) == 1


def test_candidate_moves_follow_the_order_of_the_kinds(pruner):
    importance = pruner.importance()
    estimate = LatencyEstimate(1.0, 1e6)
    moves = candidate_moves(pruner, importance, estimate, ("focused", "uniform", "global"), 9)
    regions = [m for m in moves if m.kind == "focused"]
    assert regions and moves[: len(regions)] == regions
    assert moves[len(regions) :] == [Move("uniform"), Move("global")]
    assert candidate_moves(pruner, importance, estimate, ("uniform", "focused"), 1) == [
        Move("uniform")
    ]


def test_latency_estimate_learns_region_costs_from_observations():
    estimate = LatencyEstimate(2.0, 1000.0)
    assert estimate.ms_per_mac("anything") == pytest.approx(0.002)
    learned = LatencyEstimate(
        2.0, 1000.0, [Observation("a", 100.0, 0.5), Observation("a", 100.0, 0.5)]
    )
    # Two observations at 0.005 ms/MAC pull the region's estimate well above the prior.
    assert learned.ms_per_mac("a") > 0.004
    assert learned.ms_per_mac("b") == pytest.approx(learned.network_ms_per_mac)


@pytest.mark.parametrize("kind", ["global", "latency"])
def test_a_ranked_move_takes_at_most_max_cut_of_any_group(pruner, kind):
    importance = pruner.importance()
    estimate = LatencyEstimate(1.0, 1e6)
    uncapped = removal_plan(Move(kind), pruner, importance, 1.0, estimate)
    assert any(len(idx) > 0.5 * pruner.groups_by_name[n].size for n, idx in uncapped.items())
    capped = removal_plan(Move(kind), pruner, importance, 1.0, estimate, max_cut=0.5)
    for name, indices in capped.items():
        assert len(indices) <= 0.5 * pruner.groups_by_name[name].size
    assert sum(map(len, capped.values())) > 0
    # The uniform baseline keeps its meaning: the same share of every group, uncapped.
    uniform = removal_plan(Move("uniform"), pruner, importance, 1.0, estimate, max_cut=0.5)
    assert uniform == removal_plan(Move("uniform"), pruner, importance, 1.0, estimate)
