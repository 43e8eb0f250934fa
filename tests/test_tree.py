"""The search state and tasks round-trip through JSON, as the service stores them in Redis."""

import json

from search.arch_spec import ArchSpec, build_from_spec, spec_of
from search.latency_estimate import Observation
from search.model_source import ModelRef, build_model
from search.moves import Move
from search.tree import ChildResult, ChildTask, Node, SearchState


def root_node() -> Node:
    ref = ModelRef("builtin:vgg", 10, 1)
    spec = spec_of(build_model(ref), ref, (1, 28, 28))
    return Node("n0", None, 0, None, spec, 1.5, 1.0, 0.9, False, params=10, macs=100.0)


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


def test_state_task_and_result_survive_json():
    root = root_node()
    state = SearchState(
        1.5, 100.0, 0.9, 0.2, "n0", nodes={"n0": root}, frontier=["n0"], widen_to=16
    )
    state.observations.append(Observation("features.0", 10.0, 0.1))
    again = SearchState.from_dict(through_json(state.to_dict()))
    assert again == state
    task = ChildTask(
        "n1", root, Move("focused", "features.4"), 1.2, 1, 1.5, 100.0, 0.9, widen_to=16
    )
    assert ChildTask.from_dict(through_json(task.to_dict())) == task
    result = ChildResult("n1", root, [Observation(None, 1.0, 0.01)], measurements=3)
    assert ChildResult.from_dict(through_json(result.to_dict())) == result


def test_spec_is_small_stable_and_rebuilds_the_architecture():
    root = root_node()
    text = root.spec.to_json()
    assert len(text) < 4000
    assert ArchSpec.from_json(text).hash == root.spec.hash
    narrower = ArchSpec.from_dict(
        {**root.spec.to_dict(), "layers": {**root.spec.layers, "features.0.0": [1, 8, 1],
                                           "features.0.1": [8], "features.2.0": [8, 64, 1]}}
    )  # fmt: skip
    assert narrower.hash != root.spec.hash
    model = build_from_spec(narrower)
    assert spec_of(model, narrower.model, narrower.input_shape) == narrower
