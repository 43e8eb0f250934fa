"""The engine's steps on real small models, timed by a real local oracle."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest
import torch

from archtree_cli.progress import ConsoleProgress, merged_reason
from latency.local_oracle import LocalOracle
from search.arch_spec import build_from_spec
from search.budget import parse_budget
from search.context import SearchContext
from search.engine import (
    advance,
    finish,
    plan,
    retune,
    run_search,
    start,
    to_retune,
    trim_move,
)
from search.errors import ArchtreeError
from search.inputs import load_inputs
from search.interfaces import ListEventSink
from search.moves import Move
from search.settings import SearchSettings
from search.tree import ChildResult, Node, SearchState
from tests.conftest import fast_timing
from tests.cost_model_device import BlockedConvDevice


def make_context(
    model="builtin:vgg", data="builtin:digits", oracle=None, **settings
) -> SearchContext:
    inputs = load_inputs(model, data)
    defaults = {"width": 2, "branching": 3, "ft_steps": 5, "max_probes": 4}
    return SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=oracle or LocalOracle(build_from_spec, settings=fast_timing()),
        settings=SearchSettings(**{**defaults, **settings}).effective(),
        sink=ListEventSink(),
    )


def test_unreachable_budget_stops_before_searching_and_names_the_best_reachable_latency():
    context = make_context(min_width_fraction=0.5)
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("5%"))
    message = str(error.value)
    assert "cannot be met" in message
    assert "smallest model pruning can reach measures" in message
    kinds = [e["kind"] for e in context.sink.events]
    assert "depth_started" not in kinds


class FixedCostDevice(BlockedConvDevice):
    """Convolutions as on a BlockedConvDevice, plus a fixed cost `times` the unpruned
    model's convolutions (30: pruning every channel it can saves a few percent at most)."""

    def __init__(self, *args, times: float = 30, **kwargs):
        super().__init__(*args, **kwargs)
        self.times = times

    def cost_ms(self, spec):
        return super().cost_ms(spec) + self.fixed_ms

    def measure_reference(self, reference, *, confirm=False, refresh=False):
        self.fixed_ms = 0.0
        self.fixed_ms = self.times * super().cost_ms(reference)
        return super().measure_reference(reference, confirm=confirm, refresh=refresh)


def test_a_model_pruning_barely_speeds_up_is_told_so_not_given_a_budget_it_already_meets():
    context = make_context(oracle=FixedCostDevice(1))
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("99%"))
    message = str(error.value)
    assert "cannot be met on this device: the smallest model pruning can reach measures" in message
    assert "pruning its channels barely speeds this model up here" in message
    assert "--batch-size" in message and "Give a budget" not in message
    # Nor when the budget it would need rounds up to 100%, which is refused as no pruning: the
    # smallest model at 91% of the unpruned one, 6.6% of margin over it are just under 100%.
    context = make_context(oracle=FixedCostDevice(1, times=10), margin=0.066)
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("5%"))
    assert "(91% of the unpruned" in str(error.value)
    assert "barely speeds this model up" in str(error.value), error.value
    # Where a reachable budget exists below the unpruned latency, it is the one suggested.
    context = make_context(oracle=BlockedConvDevice(1), min_width_fraction=0.5)
    with pytest.raises(ArchtreeError, match=r"Give a budget of at least .* or lower --min-width\."):
        start(context, parse_budget("5%"))
    # Where the settings keep nearly every channel, they are the reason, not the model.
    context = make_context(oracle=BlockedConvDevice(1), min_width_fraction=0.99)
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("40%"))
    assert "pruning its channels barely speeds" not in str(error.value)
    assert str(error.value).endswith(
        "(99% of the unpruned 26.656 ms): --min-width 0.99 keeps 99% of every channel group. "
        "Lower --min-width to let pruning go further."
    )


class NoisyDevice(BlockedConvDevice):
    """Times every pruned model at twice the unpruned one, as a device busy with other work
    (or with more timing threads than cores) can."""

    def measure(self, candidate, reference, *, confirm=False):
        measured = super().measure(candidate, reference, confirm=confirm)
        return replace(measured, ratio=2.0)


def test_a_smallest_model_timed_slower_than_the_unpruned_one_is_said_to_be_noise():
    context = make_context(oracle=NoisyDevice(1))
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("50%"))
    message = str(error.value)
    assert "(200% of the unpruned" in message
    assert message.endswith(
        "the smallest model measured slower than the unpruned one, most likely noisy timing "
        "(more --threads than free cores, other work on the device): time with fewer threads, "
        "on a quieter device, and run again."
    )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"min_width_fraction": 0.0, "round_to": 16}, "or lower --round-to."),
        ({"min_width_fraction": 0.3, "round_to": 16}, "or lower --min-width or --round-to."),
        # Each group down to one channel: only another architecture is smaller.
        ({"min_width_fraction": 0.0}, "or choose a smaller architecture."),
    ],
)
def test_an_unreachable_budget_names_the_options_that_set_the_smallest_widths(settings, named):
    context = make_context(oracle=BlockedConvDevice(1), **settings)
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("0.002ms"))
    assert str(error.value).endswith(named)


def test_an_unreachable_share_of_the_latency_is_answered_with_the_share_to_give():
    context = make_context(oracle=BlockedConvDevice(1), min_width_fraction=0.5)
    with pytest.raises(ArchtreeError) as error:
        start(context, parse_budget("5%"))
    given = re.search(r"Give a budget of at least (\d+)% \(([0-9.]+) ms\)", str(error.value))
    assert given, str(error.value)
    baseline = re.search(r"of the unpruned ([0-9.]+) ms", str(error.value))
    share, enough_ms = int(given[1]), float(given[2])
    assert 5 < share < 100
    assert share - 1 < 100 * enough_ms / float(baseline[1]) <= share


@pytest.mark.parametrize(
    ("round_to", "ending"),
    [
        (1, "0.01 of a channel group in one step: raise --max-cut, or raise the budget."),
        # Widths in multiples of --round-to lose a whole multiple or nothing.
        (
            8,
            "0.01 of a channel group in one step, keeping widths multiples of --round-to 8: "
            "raise --max-cut, lower --round-to, or raise the budget.",
        ),
    ],
)
def test_a_search_whose_every_move_is_skipped_names_max_cut_not_max_depth(round_to, ending):
    context = make_context(
        oracle=BlockedConvDevice(1),
        max_cut=0.01,
        max_depth=4,
        branching=2,
        planned_steps=1,
        round_to=round_to,
    )
    with pytest.raises(ArchtreeError) as error:
        run_search(context, parse_budget("60%"))
    message = str(error.value)
    assert "the search stopped at depth 1, where every move was skipped" in message
    assert message.endswith(ending), message
    assert "--max-depth" not in message
    kinds = [e["kind"] for e in context.sink.events]
    assert "child_skipped" in kinds and "node" not in kinds


class TimingsCountedDevice(BlockedConvDevice):
    def __init__(self) -> None:
        super().__init__(1)
        self.timings = 0

    def measure_reference(self, reference, *, confirm=False, refresh=False):
        self.timings += 1
        return super().measure_reference(reference, confirm=confirm, refresh=refresh)

    def measure(self, candidate, reference, *, confirm=False):
        self.timings += 1
        return super().measure(candidate, reference, confirm=confirm)


def test_a_round_to_that_keeps_every_group_whole_is_refused_before_any_timing():
    device = TimingsCountedDevice()
    context = make_context(oracle=device, round_to=1000)
    with pytest.raises(ArchtreeError, match="--round-to 1000 keeps every channel group whole"):
        start(context, parse_budget("80%"))
    assert device.timings == 0
    assert context.sink.events == []
    # The same model with room to prune is timed: the baseline and its narrowest version.
    counted = TimingsCountedDevice()
    start(make_context(oracle=counted), parse_budget("80%"))
    assert counted.timings == 2


def test_search_lands_under_budget_with_a_real_tree():
    # The narrowest digits VGG has measured up to 62% of the unpruned one on a loaded 2-core
    # machine: 80% leaves the real timing room to reach it.
    context = make_context()
    outcome = run_search(context, parse_budget("80%"))
    state = outcome.state
    assert outcome.confirmed_latency_ms <= state.budget_ms
    # A candidate of the tree is measured under budget; an answer trimmed because none
    # confirmed may be the fastest probe of its trim, which only its confirmation puts under.
    assert outcome.answer.within_budget or outcome.trims > 0
    by_depth: dict[int, int] = {}
    for node in state.nodes.values():
        by_depth[node.depth] = by_depth.get(node.depth, 0) + 1
    # Trims made while confirming the answer sit below the searched depths.
    assert all(count > 1 for depth, count in by_depth.items() if 1 <= depth <= state.depth)
    assert state.candidates_evaluated >= 3
    # Every node's parent is in the tree, one step shallower.
    for node in state.nodes.values():
        if node.parent is not None:
            assert state.nodes[node.parent].depth == node.depth - 1
    kinds = [e["kind"] for e in context.sink.events]
    for expected in ("baseline", "feasibility", "depth_started", "node", "depth_done", "done"):
        assert expected in kinds


def test_children_short_of_their_target_carry_the_search_to_the_budget():
    # One step may cut at most 15% of any group (about 28% of the work on a device whose
    # convolutions cost in proportion to their channels in and out), so the single planned
    # step cannot reach 72% less the 8% margin: its children fall short, are kept, and the
    # next depths go on from them. The device is a cost model: on real timings a step this
    # small can sit inside one of the CPU's blocks of 8 channels and gain nothing, by chance.
    context = make_context(
        oracle=BlockedConvDevice(1),
        max_cut=0.15,
        planned_steps=1,
        max_depth=6,
        width=1,
        branching=2,
        margin=0.08,
    )
    outcome = run_search(context, parse_budget("72%"))
    state = outcome.state
    assert outcome.confirmed_latency_ms <= state.budget_ms
    short = [n for n in state.nodes.values() if n.depth >= 1 and not n.within_budget]
    assert short, "no child fell short of its target"
    assert any(n.parent in {s.id for s in short} for n in state.nodes.values())
    assert outcome.answer.depth >= 2


def test_frontier_keeps_the_best_distinct_children():
    context = make_context(oracle=BlockedConvDevice(1), width=2)
    state = start(context, parse_budget("60%"))
    tasks = plan(context, state)
    assert len(tasks) == 3
    # The default moves in their order: a chain of uniform steps is always a candidate.
    assert [t.move.kind for t in tasks] == ["global", "latency", "uniform"]
    root = state.root
    spec_a = root.spec
    spec_b = replace(root.spec, layers={**root.spec.layers, "features.0.0": [1, 8, 1]})

    def node(node_id, spec, score):
        return Node(node_id, root.id, 1, "global", spec, 1.0, 0.5, score, True)

    results = [
        ChildResult("n1", node("n1", spec_b, 0.5)),
        ChildResult("n2", node("n2", spec_b, 0.9)),  # same architecture, better score
        ChildResult("n3", None, reason="cannot reach"),
        ChildResult("n4", node("n4", spec_a, 0.99)),  # identical to the root: merged away
        ChildResult("n5", node("n5", spec_b, 0.9)),  # as good as n2, evaluated after it
    ]
    state = advance(context, state, results)
    assert state.frontier == ["n2"]
    assert "n1" not in state.nodes and "n4" not in state.nodes
    # Each child merged away is said, also the one a later, better duplicate replaced.
    merged = [e for e in context.sink.events if e["kind"] == "child_merged"]
    said = [(e["id"], e.get("into"), e.get("tie")) for e in merged]
    assert said == [("n1", "n2", False), ("n4", None, None), ("n5", "n2", True)]
    assert [merged_reason(e.get("into"), tie=bool(e.get("tie"))) for e in merged] == [
        "same architecture as n2, which scored better",
        "same architecture as a node already in the tree",
        "same architecture as n2, which scored as well",
    ]
    assert state.candidates_evaluated == 5
    assert state.done  # the only frontier node is within budget


def test_frontier_takes_a_faster_child_over_a_slower_and_worse_one():
    context = make_context(oracle=BlockedConvDevice(1), width=2)
    state = start(context, parse_budget("60%"))
    root, over = state.root, state.budget_ms * 1.2

    def child(node_id, channels, latency_ms, score):
        spec = replace(root.spec, layers={**root.spec.layers, "features.0.0": [1, channels, 1]})
        return ChildResult(
            node_id, Node(node_id, root.id, 1, "global", spec, latency_ms, 0.8, score, False)
        )

    results = [
        child("n1", 20, over * 1.3, 0.90),  # the best score
        child("n2", 16, over * 1.3 * 1.1, 0.85),  # second by score, but slower and worse
        child("n3", 12, over, 0.80),  # the fastest
    ]
    state = advance(context, state, results)
    assert state.frontier == ["n1", "n3"]
    assert not state.done


def test_width_one_is_greedy():
    assert SearchSettings(strategy="archtree", width=1).effective().width == 1
    greedy = SearchSettings(strategy="greedy", width=4).effective()
    assert greedy.width == 1 and greedy.branching == 4
    uniform = SearchSettings(strategy="uniform").effective()
    assert uniform.move_kinds == ("uniform",) and uniform.width == 1
    assert uniform.max_probes == 8 and uniform.effective() == uniform  # applied twice: same
    # Its answer keeps its one ratio: no filling group by group, said when asked for.
    assert uniform.fill_probes == 0
    assert SearchSettings(strategy="uniform").ignored_by_strategy({"fill_probes"}) == [
        "--fill-probes 12 is not used: --strategy uniform runs with 0"
    ]


def test_data_free_search_scores_by_fidelity_and_reports_no_accuracy(tmp_path):
    import numpy as np

    from search.data_source import load_data
    from search.interfaces import ThreadExecutor

    digits = load_data("builtin:digits")
    unlabelled = tmp_path / "unlabelled.npz"
    np.savez(unlabelled, x=digits.train_x.numpy())
    context = make_context(data=str(unlabelled), width=2, branching=2)
    assert not context.data.labelled
    outcome = run_search(context, parse_budget("70%"), ThreadExecutor(2))
    assert outcome.final_accuracy is None and outcome.baseline_accuracy is None
    # Fidelity is minus a KL divergence: 0 for the unpruned model, below 0 for its children.
    assert outcome.state.root.score == pytest.approx(0.0, abs=1e-6)
    assert all(n.score <= 1e-6 for n in outcome.state.nodes.values())
    assert outcome.confirmed_latency_ms <= outcome.state.budget_ms


def test_taylor_importance_needs_and_uses_labels():
    context = make_context(importance="taylor", width=1, branching=2)
    # A loose budget: on a loaded machine the smallest model times near 70 % of this one.
    state = start(context, parse_budget("90%"))
    tasks = plan(context, state)
    assert len(tasks) == 2


def _plant(state, context, node_id, spec, model, latency_ms, score):
    """Add a node as if a depth had evaluated it (its latency as recorded, not re-measured)."""
    node = Node(node_id, state.root_id, 1, "global", spec, latency_ms, 0.0, score, True)
    node.ratio = latency_ms / state.baseline_ms
    context.store.put(node_id, model.state_dict())
    state.nodes[node_id] = node
    return node


def _small_child(context):
    from search.expansion import MoveApplier
    from search.latency_estimate import LatencyEstimate

    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    return applier.apply(0.9)


def _confirm_scene(next_best_score: float):
    """A finished search whose best node cannot confirm and whose next best can."""
    # No re-ranking steps: the planted scores stay as they are. Here and in the tests below
    # that plant nodes, no widening of the answer (tests/test_fill.py): the planted nodes sit
    # far under their budgets.
    context = make_context(select_steps=0, fill_probes=0)
    state = start(context, parse_budget("80%"))
    # The best-scoring node claims half the baseline but is the unpruned architecture: its
    # confirmation measures about the baseline, far above the budget. The small one times at
    # 0.5-0.6 of it at batch 1, well within.
    _plant(state, context, "n90", state.root.spec, context.base_model, 0.5 * state.baseline_ms, 2.0)
    small = _small_child(context)
    _plant(state, context, "n91", small.spec, small.model, 0.3 * state.baseline_ms, next_best_score)
    return context, state


def _lineage(state, node):
    ancestors = []
    while node.parent is not None:
        ancestors.append(node.parent)
        node = state.nodes[node.parent]
    return ancestors


def test_an_answer_that_does_not_confirm_gives_way_to_a_next_best_that_beats_it_trimmed():
    # 0.99 accuracy: more than the best, trimmed and tuned 5 steps, scores (the model is
    # untrained).
    context, state = _confirm_scene(next_best_score=0.99)
    outcome = finish(context, state, started=0.0)
    assert outcome.answer.id == "n91"
    assert outcome.trims == 0
    assert outcome.confirmed_latency_ms <= state.budget_ms
    failed = [e for e in context.sink.events if e["kind"] == "confirm_failed"]
    assert [e["id"] for e in failed] == ["n90"]
    assert failed[0]["latency_ms"] > state.budget_ms
    # The best was trimmed too, and lost the comparison.
    (compared,) = [e for e in context.sink.events if e["kind"] == "trim_compared"]
    trimmed = state.nodes[compared["trimmed"]]
    assert "n90" in _lineage(state, trimmed)
    assert compared["trimmed_score"] == trimmed.score < 0.99
    assert compared["confirmed"] == "n91" and compared["chosen"] == "n91"
    # The terminal shows the comparison.
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**compared)
    assert f"{trimmed.id} (the best, trimmed)" in stream.getvalue()
    assert "n91 is the answer" in stream.getvalue()


def test_the_best_trimmed_to_fit_is_taken_over_a_next_best_that_scores_lower():
    context, state = _confirm_scene(next_best_score=-1.0)
    outcome = finish(context, state, started=0.0)
    assert outcome.trims >= 1
    assert outcome.answer.id not in ("n90", "n91")
    assert "n90" in _lineage(state, outcome.answer)
    assert outcome.confirmed_latency_ms <= state.budget_ms
    (compared,) = [e for e in context.sink.events if e["kind"] == "trim_compared"]
    assert compared["chosen"] == outcome.answer.id == compared["trimmed"]
    assert compared["confirmed"] == "n91"


@pytest.mark.parametrize(
    ("device", "advice"),
    [
        ("cpu", "retry with --threads 1 on a quieter machine"),
        ("gpu", "retry with nothing else running on the GPU or its host"),
        ("launch-bound gpu", "retry with a larger --batch-size"),
    ],
)
def test_an_answer_that_never_confirms_is_given_advice_for_its_device(device, advice):
    # On the launch-bound GPU, the host takes 0.6 of the unpruned model's time to launch any
    # model: the smallest model waits on its launches, and the search says so before it starts.
    oracle = {
        "cpu": None,
        "gpu": BlockedConvDevice(1, gpu="NVIDIA H100"),
        "launch-bound gpu": BlockedConvDevice(1, launch_share=0.6, gpu="NVIDIA H100"),
    }[device]
    context = make_context(
        oracle=oracle, confirm_candidates=1, confirm_trims=0, select_steps=0, fill_probes=0
    )
    # Kept and read back between the steps, as the service's workers do.
    state = SearchState.from_dict(start(context, parse_budget("80%")).to_dict())
    notes = [e["message"] for e in context.sink.events if e["kind"] == "note"]
    launch_bound = device == "launch-bound gpu"
    assert state.launch_bound == launch_bound
    assert any("launching kernels from the host CPU" in note for note in notes) == launch_bound
    # The only answer claims half the baseline but is the unpruned architecture: it confirms
    # at the baseline, over the budget, and no trim is allowed.
    _plant(state, context, "n90", state.root.spec, context.base_model, 0.5 * state.baseline_ms, 1)
    with pytest.raises(ArchtreeError) as error:
        finish(context, state, started=0.0)
    message = str(error.value)
    assert "above the budget" in message and advice in message
    assert ("--threads 1" in message) == (device == "cpu")


def test_an_answer_no_candidate_confirms_is_trimmed_with_the_strategys_own_move():
    context = make_context(strategy="uniform", confirm_candidates=1, fill_probes=0)
    state = start(context, parse_budget("80%"))
    _plant(
        state, context, "n90", state.root.spec, context.base_model, 0.5 * state.baseline_ms, 0.99
    )
    small = _small_child(context)
    _plant(state, context, "n91", small.spec, small.model, 0.3 * state.baseline_ms, 0.5)
    outcome = finish(context, state, started=0.0)
    # Only the best node was confirmed (confirm_candidates=1): it was trimmed, uniformly.
    assert outcome.trims >= 1
    assert outcome.answer.id not in ("n90", "n91")
    assert outcome.answer.move == "uniform"
    assert outcome.confirmed_latency_ms <= state.budget_ms
    failed = [e["id"] for e in context.sink.events if e["kind"] == "confirm_failed"]
    assert failed == ["n90"]
    # The trimmed answer is tuned further, like any answer, after its confirmation.
    reranked = [e for e in context.sink.events if e["kind"] == "reranked"]
    assert [n["id"] for n in reranked[-1]["nodes"]] == [outcome.answer.id]


def test_trims_use_the_strategys_first_move():
    assert trim_move(SearchSettings(strategy="uniform").effective()) == Move("uniform")
    assert trim_move(SearchSettings().effective()) == Move("global")
    assert trim_move(SearchSettings(move_kinds=("focused",))) == Move("global")
    assert trim_move(SearchSettings(move_kinds=("latency", "global"))) == Move("latency")


def test_the_best_candidates_are_tuned_further_and_ranked_again_before_the_answer():
    from search.expansion import MoveApplier
    from search.latency_estimate import LatencyEstimate

    context = make_context(select_top=2, select_steps=30, fill_probes=0)
    # Both planted architectures time at 0.5-0.6 of the unpruned model at batch 1: a 90 %
    # budget lets each confirm, so the answer is decided by the re-ranking alone.
    state = start(context, parse_budget("90%"))
    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    smaller, small = applier.apply(0.9), applier.apply(0.7)
    # Recorded scores are made up; the re-ranking replaces them with real ones.
    _plant(state, context, "n90", smaller.spec, smaller.model, 0.3 * state.baseline_ms, 0.9)
    _plant(state, context, "n91", small.spec, small.model, 0.4 * state.baseline_ms, 0.8)
    _plant(state, context, "n92", small.spec, small.model, 0.4 * state.baseline_ms, 0.1)
    outcome = finish(context, state, started=0.0)
    (event,) = [e for e in context.sink.events if e["kind"] == "reranked"]
    assert event["steps"] == 30
    assert {n["id"] for n in event["nodes"]} == {"n90", "n91"}  # n92 is not in the top 2
    assert {n["id"]: n["score_before"] for n in event["nodes"]} == {"n90": 0.9, "n91": 0.8}
    scores = [n["score"] for n in event["nodes"]]
    assert scores == sorted(scores, reverse=True)  # best first, as they are confirmed
    for entry in event["nodes"]:
        node = state.nodes[entry["id"]]
        tuned = context.build(node.spec, context.store.get(node.id))
        # The stored weights are the tuned ones, and the tree holds their score.
        assert context.score(tuned) == pytest.approx(entry["score"])
        assert node.score == pytest.approx(entry["score"])
    assert not [e for e in context.sink.events if e["kind"] == "confirm_failed"]
    best = max(event["nodes"], key=lambda n: n["score"])
    assert outcome.answer.id == best["id"]


def test_candidates_retuned_elsewhere_are_ranked_by_those_results_without_tuning_again():
    # As on the service: each candidate is retuned by its own task, its weights kept apart
    # (under an attempt's id) until finish takes the results.
    context = make_context(select_top=2, select_steps=20, fill_probes=0)
    state = start(context, parse_budget("90%"))
    small = _small_child(context)
    _plant(state, context, "n90", small.spec, small.model, 0.3 * state.baseline_ms, 0.9)
    _plant(state, context, "n91", small.spec, small.model, 0.3 * state.baseline_ms, 0.8)
    _plant(state, context, "n92", small.spec, small.model, 0.3 * state.baseline_ms, 0.1)
    planted = {k: v.clone() for k, v in context.store.get("n90").items()}
    assert [n.id for n in to_retune(context, state)] == ["n90", "n91"]
    results = [retune(context, n, weights_id=f"{n.id}.a") for n in to_retune(context, state)]
    # Retuning leaves the node's own weights alone.
    assert all(torch.equal(planted[k], context.store.get("n90")[k]) for k in planted)
    tuned = {k: v.clone() for k, v in context.store.get("n90.a").items()}
    assert any(not torch.equal(planted[k], tuned[k]) for k in planted)
    # Made-up results decide the order: n91 is now the best, and is the answer.
    results[0]["score"], results[1]["score"] = 0.5, 0.95
    outcome = finish(context, state, started=0.0, retuned=results)
    assert outcome.answer.id == "n91"
    assert state.nodes["n90"].score == 0.5 and state.nodes["n91"].score == 0.95
    # finish gave each node its retuned weights, and tuned nothing again.
    assert all(torch.equal(tuned[k], context.store.get("n90")[k]) for k in tuned)
    kinds = [e["kind"] for e in context.sink.events]
    assert kinds.count("retuned") == 2 and kinds.count("reranked") == 1
    (event,) = [e for e in context.sink.events if e["kind"] == "reranked"]
    assert [(n["id"], n["score"]) for n in event["nodes"]] == [("n91", 0.95), ("n90", 0.5)]


def test_retuned_candidates_that_score_the_same_are_listed_as_confirmed_closest_to_budget_first():
    context = make_context(select_top=2, select_steps=20, fill_probes=0)
    state = start(context, parse_budget("90%"))
    small = _small_child(context)
    _plant(state, context, "n90", small.spec, small.model, 0.3 * state.baseline_ms, 0.9)
    _plant(state, context, "n91", small.spec, small.model, 0.35 * state.baseline_ms, 0.8)
    results = [
        {"id": n.id, "weights_id": n.id, "score_before": n.score, "score": 0.7}
        for n in to_retune(context, state)
    ]
    outcome = finish(context, state, started=0.0, retuned=results)
    (event,) = [e for e in context.sink.events if e["kind"] == "reranked"]
    # A tie: the one measured closer to the budget (the less pruned) is confirmed first.
    assert [n["id"] for n in event["nodes"]] == ["n91", "n90"]
    assert outcome.answer.id == "n91"


def test_a_lone_candidate_is_tuned_as_much_as_the_best_of_many():
    context = make_context(select_steps=10, fill_probes=0)
    state = start(context, parse_budget("90%"))
    small = _small_child(context)
    _plant(state, context, "n90", small.spec, small.model, 0.3 * state.baseline_ms, 0.5)
    before = {k: v.clone() for k, v in small.model.state_dict().items()}
    finish(context, state, started=0.0)
    (event,) = [e for e in context.sink.events if e["kind"] == "reranked"]
    assert [n["id"] for n in event["nodes"]] == ["n90"]
    after = context.store.get("n90")
    assert any(
        not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point()
    )


def test_a_child_is_scored_with_batch_norm_statistics_recomputed_after_its_fine_tune():
    context = make_context(bn_samples=256)
    model = context.build(context.root_spec, context.base_model.state_dict())
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms, "the test model has batch norm"
    for norm in norms:
        norm.running_mean.fill_(3.0)
    context.finetune(model, steps=2, seed=5)
    assert not any(
        torch.allclose(n.running_mean, torch.full_like(n.running_mean, 3.0)) for n in norms
    )
    # Recomputed from scratch: the same as recalibrating a copy with the statistics reset.
    from search.training import recalibrate_batch_norm

    again = context.build(context.root_spec, model.state_dict())
    recalibrate_batch_norm(again, context.data.train_x, samples=256, seed=5)
    for first, second in zip(
        norms, [m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d)], strict=True
    ):
        assert torch.allclose(first.running_mean, second.running_mean, atol=1e-5)

    off = make_context(bn_samples=0)
    untuned = off.build(off.root_spec, off.base_model.state_dict())
    first = next(m for m in untuned.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first.running_mean.fill_(3.0)
    off.finetune(untuned, steps=0, seed=5)
    assert torch.equal(first.running_mean, torch.full_like(first.running_mean, 3.0))


def test_an_answer_pruned_to_chance_without_fine_tuning_gets_a_note_saying_to_tune_longer():
    from search.report import build_report
    from search.training import train

    context = make_context(
        oracle=BlockedConvDevice(1), ft_steps=0, select_steps=0, bn_samples=0, fill_probes=0,
        width=1, branching=1,
    )  # fmt: skip
    data = context.data
    train(context.base_model, data.train_x, data.train_y, epochs=2, lr=0.05, seed=0)
    outcome = run_search(context, parse_budget("30%"))
    notes = build_report(context, outcome, inputs={})["notes"]
    assert outcome.baseline_accuracy > 0.9
    assert any(note.startswith("the pruned model scores") for note in notes), (
        outcome.final_accuracy, notes,
    )  # fmt: skip
    assert not any(note.startswith("the unpruned model scores") for note in notes)


def test_a_child_stops_between_the_probes_of_its_sizing_once_cancelled():
    """Ctrl-C with --jobs 2 waited for every child running to measure all its probes (seconds
    each on a large model), where fine-tuning asks at once."""
    from search.errors import SearchCancelled
    from search.expansion import evaluate_child

    device = TimingsCountedDevice()
    context = make_context(oracle=device)
    state = start(context, parse_budget("50%"))
    task = plan(context, state)[0]
    before = device.timings
    cancelled = replace(context, cancelled=lambda: device.timings > before)
    with pytest.raises(SearchCancelled) as stopped:
        evaluate_child(cancelled, task)
    assert device.timings == before + 1  # its first probe, and no other
    assert str(stopped.value) == f"cancelled while sizing child {task.child_id}"
