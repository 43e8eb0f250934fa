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
from search.engine import plan, start
from search.expansion import MoveApplier, evaluate_child
from search.inputs import load_inputs
from search.interfaces import ListEventSink
from search.latency_estimate import LatencyEstimate
from search.moves import Move
from search.settings import SearchSettings
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
