"""Channel groups kept whole: those torch-pruning cannot narrow soundly (grouped convolutions,
GroupNorm) and those whose narrowing breaks the model's own forward pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from search.arch_spec import build_from_spec
from search.budget import parse_budget
from search.engine import plan, start
from search.errors import ArchtreeError
from search.expansion import evaluate_child
from search.moves import Move, removal_plan
from search.prunability import groups_kept_whole
from search.pruning import PrunableModel, least_important, output_positions
from tests import odd_models
from tests.cli_process import run_archtree
from tests.cost_model_device import BlockedConvDevice
from tests.test_engine import make_context

EXAMPLE = torch.zeros(1, 1, 8, 8)


def kept_whole(build, round_to: int = 1) -> dict[str, str]:
    model = build().eval()
    positions = output_positions(model, EXAMPLE)
    return groups_kept_whole(model, EXAMPLE, positions, round_to, 0.1, "module:odd")


def test_groups_of_a_grouped_convolution_or_a_group_norm_per_channel_are_kept_whole():
    grouped = kept_whole(odd_models.grouped)
    # The group feeding the grouped convolution and its own; the 1x1 convolution after is free.
    assert set(grouped) == {"0", "3"}
    assert all("the convolution '3' runs in 4 groups" in why for why in grouped.values())
    assert kept_whole(odd_models.group_norm_per_channel) == {
        "0": "the GroupNorm '1' has 32 groups, one per channel"
    }


@pytest.mark.parametrize(
    ("build", "normalised"),
    [(odd_models.feature_map_layer_norm, "32x8x8"), (odd_models.length_layer_norm, "8")],
)
def test_a_layer_norm_over_more_or_other_than_the_channels_keeps_its_group_whole(
    build, normalised: str
):
    """torch-pruning narrows a LayerNorm's last dimension as the channels: its importance
    scoring crashed on such a group (an internal error before any timing)."""
    model = build().eval()
    example = torch.zeros(4, 1, 8, 8)
    assert kept_whole(build) == {
        "conv": f"the LayerNorm 'norm' normalises over {normalised}, not its channels"
    }
    pruner = PrunableModel(model, example, min_width_fraction=0.1, kept_whole=kept_whole(build))
    importance = pruner.importance("l2")  # was: a crash inside torch-pruning
    plan = removal_plan(Move("global"), pruner, importance, 0.5)
    assert "conv" not in plan and plan.get("mix")
    pruner.remove(plan)
    assert model(example).shape == (4, 10)


def test_a_group_norms_channels_are_pruned_in_multiples_of_its_groups():
    assert kept_whole(odd_models.group_norm_net) == {}
    model = odd_models.group_norm_net().eval()
    pruner = PrunableModel(model, EXAMPLE, min_width_fraction=0.1)
    first, second = pruner.groups_by_name["0"], pruner.groups_by_name["3"]
    assert (first.multiple, first.min_size) == (8, 8)  # 10% of 32, up to a multiple of 8
    assert (second.multiple, second.min_size) == (4, 8)  # 10% of 48, up to a multiple of 4
    # Any fraction of any move keeps multiples of the groups, and the model runs.
    importance = pruner.importance("l2")
    for kind in ("global", "uniform"):
        for fraction in (0.1, 0.37, 0.8, 1.0):
            plan = removal_plan(Move(kind), pruner, importance, fraction)
            assert all(len(idx) % pruner.groups_by_name[n].multiple == 0 for n, idx in plan.items())
    plan = removal_plan(Move("global"), pruner, importance, 0.6)
    assert plan
    pruner.remove(plan)
    model(EXAMPLE)
    assert model[1].num_channels % 8 == 0 and model[4].num_channels % 4 == 0
    # A width off the multiple is refused, not built into a model that cannot run.
    with pytest.raises(ValueError, match="multiples of 4"):
        pruner.remove({"3": [0]})


def test_a_group_norms_groups_each_lose_their_own_least_important_channels():
    importance = np.array([5.0, 1.0, 2.0, 9.0, 3.0, 8.0, 0.5, 7.0])  # two runs of four
    assert least_important(importance, 4, multiple=2) == [1, 2, 4, 6]
    # A count off the multiple is rounded down: more channels kept, never fewer.
    assert least_important(importance, 3, multiple=2) == [1, 6]
    assert least_important(importance, 3) == [1, 2, 6]


def test_an_attentions_channels_are_pruned_in_multiples_of_its_heads():
    assert kept_whole(odd_models.patch_attention) == {}
    assert kept_whole(odd_models.attention_head_per_channel) == {
        "mlp.2": "the attention 'attention' has 8 heads of one channel each"
    }
    model = odd_models.patch_attention().eval()
    pruner = PrunableModel(model, EXAMPLE, min_width_fraction=0.1)
    residual = pruner.groups_by_name["mlp.2"]  # the patches' width, through the attention
    assert (residual.size, residual.multiple, residual.min_size) == (40, 4, 4)
    importance = pruner.importance("l2")
    for kind in ("global", "uniform", "latency"):
        for fraction in (0.1, 0.37, 0.8, 1.0):
            plan = removal_plan(Move(kind), pruner, importance, fraction)
            assert len(plan.get("mlp.2", [])) % 4 == 0
    # Each head loses as many of its own channels: 40 channels, heads of 10, 3 off each.
    pruner.remove({"mlp.2": least_important(importance["mlp.2"], 12, multiple=4)})
    assert (model.attention.embed_dim, model.attention.head_dim) == (28, 7)
    assert model(EXAMPLE).shape == (1, 10)


def test_the_groups_of_layers_sharing_weights_are_kept_whole_and_no_other():
    assert kept_whole(odd_models.tied_weights) == {
        "0": "the layer '2' shares its weights with '4'",
        "2": "the layer '2' shares its weights with '4'",
        "4": "the layer '4' shares its weights with '2'",
    }
    model = odd_models.tied_weights().eval()
    pruner = PrunableModel(model, EXAMPLE, min_width_fraction=0.1)
    plan = removal_plan(Move("global"), pruner, pruner.importance("l2"), 0.5)
    assert set(plan) == {"6", "8"}  # the groups no tied layer is in
    pruner.remove(plan)
    assert model[2].weight is model[4].weight and model[6].out_channels < 24


def test_a_concatenation_added_to_other_channels_is_kept_whole_and_no_other():
    """Its parts would each need a share of a removal, which one width cannot say: narrowing
    the sum's last channels empties the second part, which torch-pruning refuses."""
    assert kept_whole(odd_models.concatenation_added) == {
        "residual": "it joins the concatenated outputs of 'a', 'b' to other channels"
    }
    model = odd_models.concatenation_added().eval()
    pruner = PrunableModel(model, EXAMPLE, min_width_fraction=0.1)
    plan = removal_plan(Move("global"), pruner, pruner.importance("l2"), 0.5)
    assert set(plan) == {"head.0"}  # the head, which the concatenation does not reach
    pruner.remove(plan)
    assert model(EXAMPLE).shape == (1, 10) and model.head[0].out_channels < 32


def test_a_group_whose_narrowing_breaks_the_forward_pass_is_kept_whole_and_no_other():
    fixed = kept_whole(odd_models.fixed_view)
    assert list(fixed) == ["b"]
    assert fixed["b"].startswith("narrowing it breaks the model: RuntimeError: shape")
    assert set(kept_whole(odd_models.checks_every_width)) == {"a", "b"}
    # A model that prunes soundly keeps nothing whole, depthwise convolutions included.
    assert kept_whole(lambda: make_context(model="builtin:mobilenetv2").base_model) == {}


def test_a_model_that_breaks_however_its_groups_are_chosen_is_refused_in_one_line():
    with pytest.raises(ArchtreeError) as error:
        kept_whole(odd_models.needs_some_width)
    message = str(error.value)
    assert message.startswith("module:odd fails once pruned, however its channel groups")
    assert "AssertionError: too narrow" in message and "x.flatten(1)" in message


def test_the_search_never_narrows_a_group_kept_whole_and_says_so():
    context = make_context(model="module:tests.odd_models:fixed_view", oracle=BlockedConvDevice(1))
    state = start(context, parse_budget("80%"))
    notes = [e["message"] for e in context.sink.events if e["kind"] == "note"]
    said = "kept whole, never pruned: the channel group of 'b'"
    assert any(note.startswith(said) for note in notes)
    smallest = [e for e in context.sink.events if e["kind"] == "feasibility"]
    assert smallest and state.measurements == 2
    # Every child the search can plan keeps 'b' whole, and its model runs.
    for task in plan(context, state):
        node = evaluate_child(context, task).node
        if node is not None:
            assert node.spec.width("b") == 32
            build_from_spec(node.spec)(EXAMPLE)


def test_prune_of_a_model_with_a_fixed_reshape_succeeds_and_reports_the_kept_group(
    tmp_path, home_dir
):
    out = tmp_path / "out"
    result = run_archtree(
        "prune", "--model", "module:tests.odd_models:fixed_view", "--data", "builtin:digits",
        "--budget", "90%", "--out", str(out), "--width", "2", "--branching", "2",
        "--ft-steps", "5", "--planned-steps", "2", "--fill-probes", "0", home=home_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert any(note.startswith("kept whole, never pruned") for note in report["notes"])
    assert report["search"]["kept_whole"]["b"].startswith("narrowing it breaks the model: ")
    assert json.loads((out / "arch.json").read_text())["layers"]["b"][1] == 32


def test_prune_of_a_model_with_only_group_norm_groups_says_why_nothing_can_be_pruned(
    tmp_path, home_dir
):
    source = "module:tests.odd_models:group_norm_per_channel"
    result = run_archtree(
        "prune", "--model", source, "--data", "builtin:digits", "--budget", "80%",
        "--out", str(tmp_path / "out"), home=home_dir,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        f"nothing in {source} can be pruned: every channel group it has must stay whole: the "
        "channel group of '0' (the GroupNorm '1' has 32 groups, one per channel)"
    ) in result.stderr
    assert "Traceback" not in result.stderr


def test_prune_of_a_group_norm_model_keeps_widths_in_multiples_of_its_groups(tmp_path, home_dir):
    out = tmp_path / "out"
    result = run_archtree(
        "prune", "--model", "module:tests.odd_models:group_norm_net", "--data",
        "builtin:digits", "--budget", "80%", "--out", str(out), "--width", "2", "--branching",
        "2", "--ft-steps", "5", "--planned-steps", "2", home=home_dir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    layers = json.loads((out / "arch.json").read_text())["layers"]
    widths = (layers["0"][1], layers["3"][1])
    assert widths[0] % 8 == 0 and widths[1] % 4 == 0 and widths != (32, 48), widths
    report = json.loads((out / "report.json").read_text())
    assert not any(note.startswith("kept whole") for note in report["notes"])


@pytest.fixture
def home_dir(tmp_path):
    return tmp_path / "home"


def test_a_candidate_the_model_cannot_run_is_refused_in_one_line_naming_its_widths():
    from search.expansion import MoveApplier
    from search.latency_estimate import LatencyEstimate
    from search.moves import Move

    context = make_context(model="module:tests.odd_models:even_widths_only")
    assert context.kept_whole == {}  # its narrowest version runs
    applier = MoveApplier(context, context.base_model, Move("uniform"), LatencyEstimate(1.0, 1.0))
    assert applier.build({"a": [0, 1]}).spec.width("a") == 30
    with pytest.raises(ArchtreeError) as error:
        applier.build({"a": [0]})
    message = str(error.value)
    assert message.startswith("module:tests.odd_models:even_widths_only fails once pruned, ")
    assert "with widths a 31 (AssertionError: odd width)" in message


def test_a_group_whose_narrowing_changes_the_output_is_kept_whole(monkeypatch):
    """Whatever layer is taken for the output layer (here the auxiliary head run after the
    classifier, as before it was told apart): a group whose narrowing changes the output's
    shape, pruning the classes, is kept whole."""
    import search.pruning
    from tests.test_pruning import MainLogits

    monkeypatch.setattr(search.pruning, "output_layer_names", lambda *_: ["inner.aux"])
    model, example = MainLogits().eval(), torch.zeros(1, 3, 8, 8)
    kept = groups_kept_whole(model, example, output_positions(model, example), 1, 0.1, "m")
    assert kept["inner.head"] == (
        "narrowing it changes the model's output: its output's shape goes from (1, 10) to (1, 1)"
    )


def test_an_attention_with_fused_queries_keys_and_values_says_why_it_is_kept_whole():
    """timm's form: torch-pruning's refusal was said as 'narrowing it breaks the model:
    ValueError: torch-pruning refused to prune 86 channels of qkv', an internal check."""
    kept = kept_whole(odd_models.fused_qkv_attention)
    assert kept["qkv"] == (
        "it cannot be narrowed: torch-pruning maps its channels through the model's reshapes "
        "onto more than it has (a layer whose outputs are split into heads of fixed sizes, as an "
        "attention's fused queries, keys and values, keeps them)"
    )
    # The residual stream, which the attention reshapes to its own width, stays whole too.
    assert kept["mlp.2"].startswith("narrowing it breaks the model: RuntimeError: shape ")
