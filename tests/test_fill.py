"""Filling the slack an answer leaves under its budget: channels given back a group at a time.

The planning (search/fill.py) is tested on its own numbers; the engine's use of it on a real
ResNet timed by a cost model of a device whose convolutions work in blocks of 8 channels
(tests/cost_model_device.py), so that the latency of every width is known exactly.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest

from archtree_cli.progress import ConsoleProgress
from search import engine
from search.budget import parse_budget
from search.engine import (
    EXCHANGE_PROBES,
    FILL_CONFIRMATIONS,
    FILL_SCORE_SLACK,
    FILL_SCORE_Z,
    run_search,
)
from search.fill import Widening, exchanges, fill, fill_in_rounds, widenings
from search.latency_estimate import LatencyEstimate
from search.score_gap import ScoreGap, paired_gap
from tests.cost_model_device import BlockedConvDevice
from tests.test_widening import conv_widths, make_context


def test_each_group_is_given_back_up_to_its_next_block_most_importance_per_ms_first():
    sizes = {"a": 32, "b": 16, "c": 24, "d": 8}
    # a keeps 20 (to 24), b keeps 13 (to 16), c keeps 16 (to 24), d lost nothing.
    removed = {"a": 12, "b": 3, "c": 8, "d": 0}
    importance = {name: np.arange(1.0, size + 1.0) for name, size in sizes.items()}
    ms_per_channel = {"a": 1.0, "b": 0.1, "c": 1.0, "d": 1.0}
    steps = widenings(sizes, removed, importance, ms_per_channel, block=8)
    # Importance given back per predicted ms: b 1+2+3 for 0.3 ms (20), a its channels 9-12
    # (the most important of those it removed) for 4 ms (10.5), c 1-8 for 8 ms (4.5).
    assert [(s.group, s.removed, s.removed_after) for s in steps] == [
        ("b", 3, 0),
        ("a", 12, 8),
        ("c", 8, 0),
    ]
    assert [s.value for s in steps] == pytest.approx([20.0, 10.5, 4.5])
    # A block of 1 gives back one channel at a time.
    (one,) = widenings({"a": 32}, {"a": 12}, importance, ms_per_channel, block=1)
    assert one.removed_after == 11


def test_the_longest_run_of_widenings_under_the_target_is_bisected_then_the_rest_tried_alone():
    cost = {"a": 1.0, "b": 5.0, "c": 2.0, "d": 0.5}
    steps = [Widening(name, 4, 0, 1.0) for name in "abcd"]
    measured = []

    def measure(counts):
        measured.append(dict(counts))
        return 10.0 + sum(cost[name] for name, n in counts.items() if n == 0)

    removed = {name: 4 for name in "abcd"}
    result = fill(removed, 10.0, steps, measure, 13.5, tolerance=0.05, max_probes=6)
    # All four (18.5) and a, b (16) are over 13.5; a alone fits (11). Then, b being what
    # broke the run, c is tried alone on top of a: 13, within 5 % of 13.5, so d never is.
    assert [(groups, ms, kept) for groups, ms, kept in result.probes] == [
        (["a", "b", "c", "d"], 18.5, False),
        (["a", "b"], 16.0, False),
        (["a"], 11.0, True),
        (["c"], 13.0, True),
    ]
    assert result.counts == {"a": 0, "b": 4, "c": 0, "d": 4}
    assert result.latency_ms == 13.0 and result.widened == ["a", "c"]
    assert measured[-1] == result.counts

    # When every widening fits, one probe gives them all back.
    roomy = fill(removed, 10.0, steps, measure, 20.0, tolerance=0.05, max_probes=6)
    assert roomy.counts == {name: 0 for name in "abcd"} and len(roomy.probes) == 1
    # Out of probes, the answer keeps what it had.
    few = fill(removed, 10.0, steps, measure, 13.5, tolerance=0.05, max_probes=2)
    assert few.counts == removed and few.latency_ms == 10.0 and len(few.probes) == 2
    # Nothing fits: the answer stays as it was.
    none = fill({"b": 4}, 10.0, steps[1:2], measure, 13.5, tolerance=0.05, max_probes=6)
    assert none.counts == {"b": 4} and none.latency_ms == 10.0 and none.widened == []


def test_rounds_give_each_group_another_block_while_the_answer_stays_well_under():
    # Two groups of 32 cut to 8 each; every channel given back costs 0.1 ms. One block (8)
    # per group reaches 10 + 1.6 = 11.6 ms, far under 14; a second round, 13.2 ms.
    sizes = {"a": 32, "b": 32}
    importance = {name: np.arange(1.0, 33.0) for name in sizes}
    rate = {"a": 0.1, "b": 0.1}

    def steps_for(counts):
        return widenings(sizes, counts, importance, rate, block=8)

    def measure(counts):
        return 10.0 + 0.1 * sum(24 - counts[name] for name in sizes)

    result = fill_in_rounds(
        {"a": 24, "b": 24}, 10.0, steps_for, measure, 14.0, tolerance=0.03, max_probes=8
    )
    # Round 1 gives both groups a block in one probe, round 2 another: 13.2 ms, within 6 % of
    # 14 but not 3 %; round 3 (both: 14.8 ms, then one: 14.0 ms) lands on the target.
    assert [ms for _, ms, _ in result.probes] == pytest.approx([11.6, 13.2, 14.8, 14.0])
    assert result.latency_ms == pytest.approx(14.0) and result.widened == ["a", "b"]
    assert sorted(result.counts.values()) == [0, 8]
    # A single round stops after one block per group.
    once = fill({"a": 24, "b": 24}, 10.0, steps_for({"a": 24, "b": 24}), measure, 14.0,
                tolerance=0.03, max_probes=8)  # fmt: skip
    assert once.latency_ms == pytest.approx(11.6)
    # Probes are shared by the rounds; a round that widens nothing ends them.
    short = fill_in_rounds(
        {"a": 24, "b": 24}, 10.0, steps_for, measure, 14.0, tolerance=0.03, max_probes=2
    )
    assert len(short.probes) == 2 and short.latency_ms == pytest.approx(13.2)
    stuck = fill_in_rounds(
        {"a": 24, "b": 24}, 10.0, steps_for, measure, 10.5, tolerance=0.03, max_probes=8
    )
    assert stuck.latency_ms == 10.0 and stuck.widened == []
    assert [ms for _, ms, kept in stuck.probes if not kept] == pytest.approx([11.6, 10.8, 10.8])


def _search(budget: str, **settings):
    context = make_context(BlockedConvDevice(8), select_steps=2, **settings)
    return context, run_search(context, parse_budget(budget))


def test_an_answer_under_a_latency_step_is_widened_group_by_group_within_the_budget():
    # At 60 % a uniform cut lands at 0.85 of the budget on this device: one more channel in
    # every group crosses a block in several of them at once.
    context, outcome = _search("60%")
    state = outcome.state
    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    answer, widened = state.nodes[filled["answer"]], state.nodes[filled["id"]]
    assert filled["answer_latency_ms"] < 0.9 * state.budget_ms
    assert widened.filled_from == answer.id and widened.parent == answer.parent
    assert filled["rebuilt_from"] == answer.parent
    # Wider in the groups it names and nowhere narrower; faster than the budget, slower than
    # the answer it was widened from.
    before, after = conv_widths(answer.spec), conv_widths(widened.spec)
    assert all(after[name] >= width for name, width in before.items())
    assert filled["groups"] and all(after[g] > before[g] for g in filled["groups"])
    assert all(
        after[g] % 8 == 0 or after[g] == conv_widths(state.root.spec)[g] for g in filled["groups"]
    )
    assert filled["answer_latency_ms"] < filled["latency_ms"] <= state.budget_ms * (1 - 0.03)
    # Tuned as the answer was, and taken unless it scores clearly lower: by more than half a
    # point and two standard errors of the difference, judged image by image.
    assert any(
        e["kind"] == "reranked" and [n["id"] for n in e["nodes"]] == [widened.id]
        for e in context.sink.events
    )
    assert filled["score_gap"] == pytest.approx(filled["score"] - filled["answer_score"], abs=1e-6)
    # The gap and its standard error are those of the two stored models' per-image scores.
    paired = paired_gap(
        context.sample_scores(context.build(widened.spec, context.store.get(widened.id))),
        context.sample_scores(context.build(answer.spec, context.store.get(answer.id))),
    )
    assert filled["score_gap"] == pytest.approx(paired.difference, abs=1e-9)
    assert filled["score_gap_se"] == pytest.approx(paired.standard_error, abs=1e-9)
    gap = ScoreGap(filled["score_gap"], filled["score_gap_se"], len(context.data.calib_x))
    taken = not gap.clearly_below(FILL_SCORE_SLACK, FILL_SCORE_Z)
    assert filled["chosen"] == outcome.answer.id == (widened.id if taken else answer.id)
    assert outcome.confirmed_latency_ms == (
        filled["latency_ms"] if taken else filled["answer_latency_ms"]
    )
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**filled)
    assert f"{widened.id}: {answer.id} widened in {filled['groups'][0]}" in stream.getvalue()

    # Turned off, the search ends on the answer below the step.
    context, outcome = _search("60%", fill_probes=0)
    assert not [e for e in context.sink.events if e["kind"] == "filled"]
    assert outcome.answer.id == answer.id
    assert outcome.confirmed_latency_ms == filled["answer_latency_ms"]


def test_the_uniform_strategys_answer_keeps_its_one_ratio_under_a_latency_step():
    # The budget at which the answer above is widened group by group: the uniform strategy's
    # answer is the widest uniform cut its bisection measured under the aim, left as it is.
    context = make_context(BlockedConvDevice(8), select_steps=2, strategy="uniform")
    context = replace(context, settings=context.settings.effective())
    outcome = run_search(context, parse_budget("60%"))
    assert not [e for e in context.sink.events if e["kind"] == "filled"]
    assert outcome.answer.filled_from is None and outcome.answer.move == "uniform"
    # Every group kept the same share of its removable channels (all but --min-width's), up
    # to its widening to the device's block of 8 channels.
    root, settings = conv_widths(outcome.state.root.spec), context.settings
    share = 1 - outcome.answer.fraction * (1 - settings.min_width_fraction)
    for name, width in conv_widths(outcome.answer.spec).items():
        assert abs(width - share * root[name]) < 8 + 1, (name, width, root[name])
    assert outcome.confirmed_latency_ms < 0.9 * outcome.state.budget_ms


class DriftingDevice(BlockedConvDevice):
    """Times confirmations of models slower than `above` (a share of the unpruned model's
    latency) `factor` times slower than their probes: the machine drifted in between."""

    def __init__(self, block: int, above: float, factor: float) -> None:
        super().__init__(block)
        self.above, self.factor = above, factor

    def measure(self, candidate, reference, *, confirm: bool = False):
        measurement = super().measure(candidate, reference, confirm=confirm)
        if confirm and measurement.ratio > self.above:
            measurement = replace(measurement, ratio=measurement.ratio * self.factor)
        return measurement


@pytest.mark.parametrize("above", [0.555, 0.54, 0.512])
def test_a_widening_that_confirms_over_the_budget_gives_way_to_a_narrower_one(
    above: float, monkeypatch: pytest.MonkeyPatch
):
    # At 60 % the answer lands at 0.51 of the unpruned latency and the widenings reached go up
    # to 0.57 of it (under the aim, 0.58). Confirmed 20 % slower above `above`, the widest
    # fail: above 0.555 two of them, and the third (0.546) is the one tuned. Above 0.54 all
    # three fail; the fill is tried again with its aim lowered by the share the narrowest was
    # over the budget, and reaches a narrower widening, which confirms. Above 0.512 that one
    # fails as well, and the answer stays. Trades, which would add a step between the widest
    # widening and the aim, are left out here (tested on their own below).
    monkeypatch.setattr(engine, "EXCHANGE_PROBES", 0)
    context = make_context(DriftingDevice(8, above=above, factor=1.2), select_steps=2)
    outcome = run_search(context, parse_budget("60%"))
    state = outcome.state
    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    assert all(ms > state.budget_ms for ms in filled["unconfirmed_ms"])
    aims = filled["aims_ms"]
    assert aims[0] == pytest.approx(state.budget_ms * (1 - 0.03))
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**filled)
    if above > 0.55:
        assert len(filled["unconfirmed_ms"]) == 2 and len(aims) == 1
        widened = state.nodes[filled["id"]]
        assert widened.filled_from == filled["answer"] and outcome.answer.id == widened.id
        assert widened.latency_ms == filled["latency_ms"] == outcome.confirmed_latency_ms
        assert 0.54 * state.baseline_ms < filled["latency_ms"] <= above * state.baseline_ms
        assert f"{widened.id}: {filled['answer']} widened in" in stream.getvalue()
        assert "filled again" not in stream.getvalue()
        return
    # The second attempt aims lower by the share the last widening confirmed over the budget.
    assert len(aims) == 2
    after_first = filled["unconfirmed_ms"][FILL_CONFIRMATIONS - 1]
    assert aims[1] == pytest.approx(aims[0] * state.budget_ms / after_first)
    assert f"filled again aiming at {aims[1]:.3f} ms" in stream.getvalue()
    if above > 0.52:
        assert len(filled["unconfirmed_ms"]) == FILL_CONFIRMATIONS
        widened = state.nodes[filled["id"]]
        assert outcome.answer.id == widened.id
        assert filled["answer_latency_ms"] < filled["latency_ms"] <= aims[1]
        assert filled["latency_ms"] == outcome.confirmed_latency_ms <= above * state.baseline_ms
    else:
        assert len(filled["unconfirmed_ms"]) > FILL_CONFIRMATIONS and filled["id"] is None
        assert outcome.answer.id == filled["answer"]
        assert outcome.confirmed_latency_ms < above * state.baseline_ms
        assert "its widenings confirmed above the budget" in stream.getvalue()


def test_an_answer_near_its_aim_is_not_widened():
    # At 40 % the uniform cut lands within the fit tolerance of the aim.
    context, outcome = _search("40%")
    aim_ms = outcome.state.budget_ms * (1 - 0.03)
    assert outcome.confirmed_latency_ms >= aim_ms * (1 - 0.01)
    assert not [e for e in context.sink.events if e["kind"] == "filled"]
    assert outcome.answer.filled_from is None


def _cut_child(context, state, parent, cuts: dict[str, int]):
    """A node of the tree: `parent` with the least important `cuts[group]` channels of each
    named group removed, tuned and scored as a search's child is."""
    from search.engine import _child_task
    from search.expansion import MoveApplier, tuned_child
    from search.latency_estimate import LatencyEstimate
    from search.moves import Move
    from search.pruning import least_important

    model = context.build(parent.spec, context.store.get(parent.id))
    estimate = LatencyEstimate(state.baseline_ms, state.baseline_macs)
    applier = MoveApplier(context, model, Move("global"), estimate)
    child = applier.build(
        {name: least_important(applier.importance[name], n) for name, n in cuts.items()}
    )
    latency_ms = context.oracle.cost_ms(child.spec)
    task = _child_task(state, parent, Move("global"), latency_ms, parent.depth + 1)
    node = tuned_child(context, task, child, latency_ms, fraction=None)
    state.nodes[node.id] = node
    return node


def test_groups_cut_by_earlier_moves_are_given_back_from_the_nearest_ancestor_that_has_them():
    # root -> n1 cuts stage1.0.conv1 24 -> 8 -> n2 cuts stage3.0.shortcut.0 96 -> 40. A block
    # of 8 back in the shortcut's group costs 1.152 ms on this device, one in stage1.0.conv1
    # 0.384 ms; with 0.8 ms of slack under the aim, only the group n2's parent already had
    # cut can take channels back, so the widening is rebuilt from the root.
    from search.engine import _fill_slack, start
    from search.rebuild import AncestorRebuilds

    device = BlockedConvDevice(8)
    context = make_context(device, select_steps=2)
    state = start(context, parse_budget("90%"))
    n1 = _cut_child(context, state, state.root, {"stage1.0.conv1": 16})
    n2 = _cut_child(context, state, n1, {"stage3.0.shortcut.0": 56})
    answer_ms = n2.latency_ms
    state.budget_ms = (answer_ms + 0.8) / (1 - context.settings.margin)
    assert context.settings.aim_ms(state.budget_ms) == pytest.approx(answer_ms + 0.8)

    answer, latency_ms = _fill_slack(context, state, n2, answer_ms)

    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    assert filled["answer"] == n2.id and filled["rebuilt_from"] == state.root.id
    assert filled["groups"] == ["stage1.0.conv1"]
    widened = state.nodes[filled["id"]]
    assert widened.parent == state.root.id and widened.filled_from == n2.id
    before, after = conv_widths(n2.spec), conv_widths(widened.spec)
    assert after["stage1.0.conv1"] in (16, 24) and after["stage3.0.shortcut.0"] == 40
    assert {k: v for k, v in after.items() if k != "stage1.0.conv1"} == {
        k: v for k, v in before.items() if k != "stage1.0.conv1"
    }
    assert answer_ms < filled["latency_ms"] == device.cost_ms(widened.spec) <= state.budget_ms
    # The parent's groups were tried first: the shortcut's block alone, over the aim.
    assert filled["probes"] >= 2
    assert (answer.id, latency_ms) in {(widened.id, filled["latency_ms"]), (n2.id, answer_ms)}
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**filled)
    assert f"{widened.id}: {n2.id} widened in stage1.0.conv1 (rebuilt from n0) to" in (
        stream.getvalue()
    )

    # Widths the parent holds are rebuilt from the parent; wider ones from an older ancestor.
    rebuilds = AncestorRebuilds(context, state, n2, LatencyEstimate(state.baseline_ms, 1.0))
    assert [a.id for a in rebuilds.ancestors] == [n1.id, state.root.id]
    assert rebuilds.covering({"stage3.0.shortcut.0": 48}).id == n1.id
    assert rebuilds.covering({"stage1.0.conv1": 16}).id == state.root.id
    assert rebuilds.covering({"stage3.0.shortcut.0": 48, "stage1.0.conv1": 8}).id == n1.id


def test_a_block_too_costly_for_the_slack_is_given_back_by_halves():
    # The device reports blocks of 16 but computes in blocks of 8. n1 keeps 4 of
    # stage1.0.conv1's 24 channels: back to 16 costs 0.384 ms here, back to 8 nothing, and
    # the slack is 0.3 ms. The shortcut's group, cut last, costs 1.152 ms a block.
    from search.engine import _fill_slack, start

    device = BlockedConvDevice(8, reported_block=16)
    context = make_context(device, select_steps=2)
    state = start(context, parse_budget("90%"))
    assert state.widen_to == 16
    n1 = _cut_child(context, state, state.root, {"stage1.0.conv1": 20})
    n2 = _cut_child(context, state, n1, {"stage3.0.shortcut.0": 56})
    state.budget_ms = (n2.latency_ms + 0.3) / (1 - context.settings.margin)

    _fill_slack(context, state, n2, n2.latency_ms)

    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    widened = state.nodes[filled["id"]]
    assert filled["groups"] == ["stage1.0.conv1"] and filled["rebuilt_from"] == state.root.id
    assert conv_widths(widened.spec)["stage1.0.conv1"] == 8
    assert conv_widths(widened.spec)["stage3.0.shortcut.0"] == 40


def test_a_widening_over_the_target_is_traded_for_a_block_of_another_group():
    widths = {"a": 16, "b": 16, "c": 48, "d": 8}
    sizes = {"a": 24, "b": 24, "c": 48, "d": 8}
    min_sizes = {"a": 4, "b": 4, "c": 4, "d": 8}
    importance = {name: np.arange(1.0, size + 1.0) for name, size in sizes.items()}
    ms_per_channel = {"a": 0.1, "b": 0.05, "c": 0.1, "d": 1.0}
    over = [
        ({**widths, "a": 24}, 10.6),
        ({**widths, "a": 24, "b": 24}, 10.2),  # two groups at once: not a widening to trade
        ({**widths, "b": 24}, 10.3),
        ({**widths, "a": 32}, 11.0),  # a again, with a larger overshoot
    ]

    def trials(**kwargs):
        return exchanges(widths, over, sizes, min_sizes, importance, ms_per_channel, 8, 10.0,
                         **kwargs)  # fmt: skip

    # b's widening is 0.3 ms over, a's 0.6. A block off a saves 0.8 ms predicted and loses
    # importance 9..16 (100, 125 per ms); off c 0.8 ms for 1..8 (36, 45 per ms); off b 0.4 ms,
    # short of a's overshoot; d is at its minimum. c loses least per ms saved. Each widening
    # gets its first choice (b's first, the least over), then its second.
    assert trials() == [
        {**widths, "b": 24, "c": 40},
        {**widths, "a": 24, "c": 40},
        {**widths, "b": 24, "a": 8},
        {**widths, "a": 24, "b": 8},
    ]
    # The groups the answer's last move cut come first, even when predicted to save too little.
    assert trials(preferred={"a", "b"}) == [
        {**widths, "b": 24, "a": 8},
        {**widths, "a": 24, "b": 8},
        {**widths, "b": 24, "c": 40},
        {**widths, "a": 24, "c": 40},
    ]
    # With no group predicted to save the overshoot, the one that saves most first.
    faster_b = {**ms_per_channel, "b": 0.2}
    assert exchanges(widths, [({**widths, "a": 24}, 20.0)], sizes, min_sizes, importance,
                     faster_b, 8, 10.0) == [{**widths, "a": 24, "b": 8},
                                            {**widths, "a": 24, "c": 40}]  # fmt: skip
    # A group narrows to its minimum at most, and nothing is traded with no other group.
    assert exchanges({"a": 16, "b": 6}, [({"a": 24, "b": 6}, 11.0)], sizes, min_sizes,
                     importance, ms_per_channel, 8, 10.0) == [{"a": 24, "b": 4}]  # fmt: skip
    assert exchanges({"a": 16}, [({"a": 24}, 11.0)], sizes, min_sizes, importance,
                     ms_per_channel, 8, 10.0) == []  # fmt: skip


class SlowKernelDevice(BlockedConvDevice):
    """Blocks of 8, and a slow kernel for stage1.0.conv1 wider than 16 channels: `extra_ms`
    more, a latency step of one layer such as a CPU's kernel choice makes."""

    def __init__(self, extra_ms: float) -> None:
        super().__init__(8)
        self.extra_ms = extra_ms

    def cost_ms(self, spec) -> float:
        slow = spec.layers["stage1.0.conv1"][1] > 16
        return super().cost_ms(spec) + (self.extra_ms if slow else 0.0)


def test_an_answer_no_widening_fills_trades_one_groups_block_for_anothers():
    # n1 cuts the stem's residual group and stage1.0.conv1 from 24 to 16 channels. On this
    # device a block back in the residual group costs 1.088 ms; in stage1.0.conv1 0.256 ms
    # and the slow kernel's 1.2. With 0.5 ms of slack neither fits. Traded for a block of the
    # other group: the residual group at 24 and stage1.0.conv1 at 8 costs 0.704 ms, over;
    # stage1.0.conv1 at 24 and the residual group at 8 costs 0.24 ms, within the slack.
    from search.engine import _fill_slack, start

    device = SlowKernelDevice(extra_ms=1.2)
    context = make_context(device, select_steps=2)
    state = start(context, parse_budget("90%"))
    n1 = _cut_child(context, state, state.root, {"stem.0": 8, "stage1.0.conv1": 8})
    state.budget_ms = (n1.latency_ms + 0.5) / (1 - context.settings.margin)

    answer, latency_ms = _fill_slack(context, state, n1, n1.latency_ms)

    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    assert [(t["widened"], t["narrowed"], t["kept"]) for t in filled["trades"]] == [
        (["stem.0"], ["stage1.0.conv1"], False),
        (["stage1.0.conv1"], ["stem.0"], True),
    ]
    assert [t["latency_ms"] - n1.latency_ms for t in filled["trades"]] == pytest.approx(
        [0.704, 0.24]
    )
    assert len(filled["trades"]) <= EXCHANGE_PROBES
    traded = state.nodes[filled["id"]]
    after = conv_widths(traded.spec)
    assert after["stage1.0.conv1"] == 24 and after["stem.0"] == after["stage1.0.conv2"] == 8
    assert filled["groups"] == ["stage1.0.conv1"] and filled["narrowed"] == ["stem.0"]
    assert filled["latency_ms"] == pytest.approx(n1.latency_ms + 0.24)
    assert (answer.id, latency_ms) in {(traded.id, filled["latency_ms"]), (n1.id, n1.latency_ms)}
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**filled)
    assert f"{traded.id}: {n1.id} widened in stage1.0.conv1 and narrowed in stem.0" in (
        stream.getvalue()
    )

    # Where the trade lands no nearer the aim than the answer, the answer stays.
    context = make_context(SlowKernelDevice(extra_ms=0.9), select_steps=2)
    state = start(context, parse_budget("90%"))
    n1 = _cut_child(context, state, state.root, {"stem.0": 8, "stage1.0.conv1": 8})
    state.budget_ms = (n1.latency_ms + 0.5) / (1 - context.settings.margin)
    answer, latency_ms = _fill_slack(context, state, n1, n1.latency_ms)
    (filled,) = [e for e in context.sink.events if e["kind"] == "filled"]
    assert filled["id"] is None and answer.id == n1.id and latency_ms == n1.latency_ms
    trades = filled["trades"]
    # The two trades within the last move's groups first, then others, up to the limit.
    assert len(trades) == EXCHANGE_PROBES
    assert [(t["widened"], t["narrowed"]) for t in trades[:2]] == [
        (["stem.0"], ["stage1.0.conv1"]),
        (["stage1.0.conv1"], ["stem.0"]),
    ]
    assert all(t["narrowed"][0] not in ("stem.0", "stage1.0.conv1") for t in trades[2:])
    assert trades[1]["latency_ms"] == pytest.approx(n1.latency_ms - 0.06)
    aim_ms = context.settings.aim_ms(state.budget_ms)
    assert not any(t["kept"] or n1.latency_ms < t["latency_ms"] <= aim_ms for t in trades)
    stream = io.StringIO()
    ConsoleProgress(stream).emit(**filled)
    assert "no group could be widened or traded for another's block within it" in (
        stream.getvalue()
    )
    assert f"({filled['probes']} probes in all, over its passes)" in stream.getvalue()
