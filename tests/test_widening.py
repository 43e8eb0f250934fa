"""Widening a sized child's channel groups to multiples of `widen_to`, kept only when the
measured latency allows it.

The device here is a cost model (tests/cost_model_device.py), so that the latency of every width
is known exactly: one whose convolutions work in blocks of channels (as oneDNN's do on AVX2, in
blocks of 8), and one whose convolutions cost in proportion to their channels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from search.arch_spec import ArchSpec
from search.budget import parse_budget
from search.context import SearchContext
from search.engine import plan, run_search, start
from search.expansion import MoveApplier, evaluate_child, widening_multiples
from search.inputs import load_inputs
from search.interfaces import ListEventSink
from search.latency_estimate import LatencyEstimate
from search.moves import Move
from search.settings import DEFAULT_CHANNEL_BLOCK, SearchSettings
from tests.cost_model_device import BlockedConvDevice


def make_context(device: BlockedConvDevice, **settings: Any) -> SearchContext:
    inputs = load_inputs("builtin:resnet", "builtin:digits")
    defaults = {
        "width": 1,
        "branching": 1,
        "planned_steps": 1,
        "move_kinds": ("uniform",),
        "ft_steps": 2,
        "max_probes": 8,
        "fit_tolerance": 0.01,
    }
    return SearchContext(
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=device,
        settings=SearchSettings(**{**defaults, **settings}),
        sink=ListEventSink(),
    )


def conv_widths(spec: ArchSpec) -> dict[str, int]:
    return {name: shape[1] for name, shape in spec.layers.items() if len(shape) == 3}


def first_child(context: SearchContext, budget: str):
    state = start(context, parse_budget(budget))
    task = plan(context, state)[0]
    return task, evaluate_child(context, task).node


def test_widened_plan_removes_fewer_of_the_least_important_channels():
    context = make_context(BlockedConvDevice(8))
    context.prepare()
    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    narrow = applier.plan(0.45)
    wide = applier.widened(narrow, 8)
    assert narrow != wide
    for name, removed in narrow.items():
        group = applier.pruner.groups_by_name[name]
        kept = group.size - len(removed)
        kept_wide = group.size - len(wide.get(name, []))
        expected = kept if kept <= 8 else min(group.size, math.ceil(kept / 8) * 8)
        assert kept_wide == expected
        # The channels put back are the most important of those the narrow plan removes.
        assert set(wide.get(name, [])) <= set(removed)
        importance = applier.importance[name]
        put_back = sorted(set(removed) - set(wide.get(name, [])))
        still_removed = wide.get(name, [])
        if put_back and still_removed:
            assert np.min(importance[put_back]) >= np.max(importance[still_removed])


def test_a_child_is_widened_where_blocks_make_the_extra_channels_free():
    context = make_context(BlockedConvDevice(8))
    task, node = first_child(context, "45%")
    assert node is not None and node.widened_to == 8
    widths = conv_widths(node.spec)
    assert all(width <= 8 or width % 8 == 0 for width in widths.values()), widths
    assert node.latency_ms <= task.target_ms
    # The same child without widening: as fast on this device, with fewer channels.
    narrow_context = make_context(BlockedConvDevice(8), widen_to=0)
    _, narrow = first_child(narrow_context, "45%")
    assert narrow is not None and narrow.widened_to is None
    assert node.latency_ms == pytest.approx(narrow.latency_ms)
    assert node.params > narrow.params
    assert any(w % 8 for w in conv_widths(narrow.spec).values() if w > 8)


def test_widths_stay_multiples_of_round_to_through_widening_and_the_fill():
    # Widened to multiples of 8 and of 12: of 24, which this device computes at once.
    base = conv_widths(make_context(BlockedConvDevice(24)).root_spec)
    context = make_context(
        BlockedConvDevice(24), round_to=12, widen_to=8, move_kinds=("global",), select_steps=0
    )
    context.prepare()
    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    wide = applier.widened(applier.plan(0.45), 8)
    for name, group in applier.pruner.groups_by_name.items():
        kept = group.size - len(wide.get(name, []))
        assert kept % 12 == 0 or kept == group.size, (name, kept)
    outcome = run_search(context, parse_budget("45%"))
    filled = [e for e in context.sink.events if e["kind"] == "filled" and e["id"]]
    assert filled and filled[0]["groups"]
    for node in outcome.state.nodes.values():
        widths = conv_widths(node.spec)
        assert all(w % 12 == 0 or w == base[n] for n, w in widths.items()), (node.id, widths)


def test_a_child_stays_narrow_where_every_channel_costs_time():
    context = make_context(BlockedConvDevice(1))
    task, node = first_child(context, "45%")
    assert node is not None and node.widened_to is None
    assert node.latency_ms <= task.target_ms
    assert any(w % 8 for w in conv_widths(node.spec).values() if w > 8)


def test_negative_widen_to_is_refused_in_one_line():
    from search.errors import ArchtreeError

    with pytest.raises(ArchtreeError, match="--widen-to cannot be negative"):
        SearchSettings(widen_to=-8).validate()
    with pytest.raises(ArchtreeError, match="--widen-to must be at most 4096, wider than any"):
        SearchSettings(widen_to=100_000).validate()
    SearchSettings(widen_to=4096).validate()


def test_the_uniform_strategy_takes_any_planned_steps_since_it_plans_one():
    from search.errors import ArchtreeError

    given = SearchSettings(strategy="uniform", planned_steps=5, max_depth=3)
    assert given.effective().planned_steps == 1
    assert given.ignored_by_strategy({"planned_steps"}) == [
        "--planned-steps 5 is not used: --strategy uniform runs with 1"
    ]
    with pytest.raises(ArchtreeError, match="--max-depth must be at least --planned-steps"):
        SearchSettings(strategy="archtree", planned_steps=5, max_depth=3).effective()


def test_groups_are_widened_to_the_channel_block_the_device_reports():
    # On a device computing 16 channels at a time, 20 channels cost as much as 32: widening to
    # multiples of 8 would stop at 24 and leave 8 free channels unused.
    context = make_context(BlockedConvDevice(16, reported_block=16))
    task, node = first_child(context, "45%")
    feasibility = next(e for e in context.sink.events if e["kind"] == "feasibility")
    assert feasibility["channel_block"] == 16 and feasibility["widen_to"] == 16
    assert task.widen_to == 16
    assert node is not None and node.widened_to == 16
    widths = conv_widths(node.spec)
    assert all(width <= 16 or width % 16 == 0 for width in widths.values()), widths
    assert node.latency_ms <= task.target_ms
    # A device that does not report its block is widened to the default multiple.
    unreported = make_context(BlockedConvDevice(16))
    task, node = first_child(unreported, "45%")
    assert task.widen_to == DEFAULT_CHANNEL_BLOCK
    assert node is not None and node.widened_to == DEFAULT_CHANNEL_BLOCK


def test_an_explicit_widen_to_overrides_the_device_block():
    settings = SearchSettings(widen_to=8)
    assert settings.widen_multiple(16) == 8
    assert SearchSettings(widen_to=0).widen_multiple(16) == 0
    assert SearchSettings().widen_multiple(16) == 16
    assert SearchSettings().widen_multiple(None) == DEFAULT_CHANNEL_BLOCK
    context = make_context(BlockedConvDevice(16, reported_block=16), widen_to=0)
    _, node = first_child(context, "45%")
    assert node is not None and node.widened_to is None


@pytest.mark.parametrize(("capability", "block"), [("AVX512", 16), ("AVX2", 8), ("DEFAULT", None)])
def test_a_cpu_reports_the_channel_block_of_its_vector_extension(monkeypatch, capability, block):
    import torch

    from latency.fingerprint import channel_block, device_fingerprint

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert channel_block("cpu") == block
    assert device_fingerprint("cpu", 1, 1, "float32", (1, 8, 8))["channel_block"] == block
    # A GPU's kernels are not blocked this way: no block is claimed for it.
    assert channel_block("cuda") is None


def test_a_widening_that_costs_time_falls_back_to_half_the_multiple():
    # The device reports 16 but computes in blocks of 8: widening to multiples of 16 costs
    # time, to multiples of 8 it is free, and that one is kept.
    context = make_context(BlockedConvDevice(8, reported_block=16))
    task, node = first_child(context, "45%")
    assert task.widen_to == 16
    assert node is not None and node.widened_to == 8
    widths = conv_widths(node.spec)
    assert all(width <= 8 or width % 8 == 0 for width in widths.values()), widths
    assert any(width > 16 and width % 16 for width in widths.values()), widths
    assert node.latency_ms <= task.target_ms


def test_widening_multiples_halve_down_to_the_default_block():
    assert widening_multiples(16) == [16, 8]
    assert widening_multiples(32) == [32, 16, 8]
    assert widening_multiples(8) == [8]
    assert widening_multiples(12) == [12]
    assert widening_multiples(4) == [4]
    assert widening_multiples(1) == [] and widening_multiples(0) == []
