"""End to end: the real `archtree` command in subprocesses: searches, their output and
results, the demo, stops and help."""

from __future__ import annotations

import io
import json
import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from archtree_cli.commands import counted
from archtree_cli.progress import ConsoleProgress
from search.compute_device import describe_device, resolve_train_device
from search.notes import NOTHING_PRUNED, NOTHING_PRUNED_DATA_FREE
from search.settings import SearchSettings
from tests.cli_process import (
    FAST,
    REACHABLE,
    ROOT,
    archtree,
    main_here,
    one_line_error,
    prune_args,
    run_archtree,
    started_archtree,
)
from tests.redis_fixtures import wait_until


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory) -> Path:
    from search.model_source import ModelRef, build_model, save_weights

    torch.manual_seed(1)
    model = build_model(ModelRef("builtin:resnet", num_classes=10, in_channels=1))
    path = tmp_path_factory.mktemp("weights") / "resnet.safetensors"
    save_weights(model, path)
    return path


def nodes_per_depth(report: dict) -> dict[int, int]:
    counts: dict[int, int] = {}
    for node in report["tree"]:
        counts[node["depth"]] = counts.get(node["depth"], 0) + 1
    return counts


@pytest.mark.slow
def test_prune_meets_the_budget_and_the_model_reloads_identically(tmp_path, home, resnet_weights):
    out = tmp_path / "pruned"
    archtree(
        "prune", "--model", "builtin:resnet", "--weights", str(resnet_weights),
        "--data", "builtin:mnist", "--budget", "60%", "--out", str(out), *FAST,
        "--branching", "2", "--ft-steps", "3", home=home,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["latency_ms"] <= report["budget_ms"]
    assert report["budget_ms"] == pytest.approx(0.6 * report["baseline"]["latency_ms"])
    assert report["final"]["params"] < report["baseline"]["params"]
    assert NOTHING_PRUNED not in report["notes"]
    assert 0.0 <= report["final"]["accuracy"] <= 1.0
    for key in ("strategy", "width", "branching", "depths", "candidates_evaluated",
                "latency_measurements", "cache_hits", "wall_s"):  # fmt: skip
        assert key in report["search"]
    # Fine-tuned where --train-device's default puts it: a GPU of this machine, else the CPU.
    assert report["search"]["training_device"] == describe_device(resolve_train_device("auto"))
    for key in ("device_class", "host", "threads", "batch_size", "dtype", "input_shape"):
        assert key in report["device"]
    counts = nodes_per_depth(report)
    # Trims made while confirming the answer sit below the searched depths.
    searched = report["search"]["depths"]
    assert all(counts[d] > 1 for d in counts if 1 <= d <= searched)
    ids = {n["id"] for n in report["tree"]}
    assert report["final"]["node"] in ids
    assert all(n["parent"] in ids for n in report["tree"] if n["parent"])

    # The saved model reloads in a fresh process with identical outputs.
    probe = tmp_path / "probe.pt"
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    torch.save({"x": x}, probe)
    script = (
        "import sys, torch; from search import load_pruned; "
        "m = load_pruned(sys.argv[1]); x = torch.load(sys.argv[2])['x']; "
        "torch.save({'y': m(x).detach()}, sys.argv[3])"
    )
    fresh = tmp_path / "fresh.pt"
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(probe), str(fresh)],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    from search import load_pruned

    here = load_pruned(out)(x).detach()
    assert torch.equal(torch.load(fresh)["y"], here)
    spec = json.loads((out / "arch.json").read_text())
    assert len((out / "arch.json").read_bytes()) < 16_000
    assert spec["model"]["source"] == "builtin:resnet"

    # An existing result is never overwritten by accident.
    again = archtree(
        "prune", "--model", "builtin:resnet", "--data", "builtin:mnist", "--budget", "60%",
        "--out", str(out), home=home, check=False,
    )  # fmt: skip
    assert again.returncode == 2
    assert "--overwrite" in again.stderr


def test_a_data_free_search_whose_budget_the_model_meets_says_fidelity(tmp_path, home):
    data = tmp_path / "inputs.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(300, 1, 8, 8)).astype(np.float32))
    out = tmp_path / "unpruned"
    result = archtree(
        "prune", "--model", "builtin:vgg", "--data", str(data), "--budget", "1000ms",
        "--out", str(out), "--final-epochs", "0", home=home,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["notes"] == [NOTHING_PRUNED_DATA_FREE]
    # The unpruned model's fidelity to itself is 0, not -0.
    assert report["final"]["fidelity"] == 0 and math.copysign(1, report["final"]["fidelity"]) > 0
    assert "-0.0000" not in result.stdout


def test_an_untrained_model_and_a_budget_it_already_meets_get_notes(tmp_path, home):
    out = tmp_path / "unpruned"
    result = archtree(
        "prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "1000ms",
        "--out", str(out), "--final-epochs", "0", home=home,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["params"] == report["baseline"]["params"]
    untrained, nothing_pruned = report["notes"]
    assert nothing_pruned == NOTHING_PRUNED
    # No --weights: the builtin VGG is untrained, which the search says as soon as it knows.
    assert untrained.startswith("the unpruned model scores") and "weights missing" in untrained
    assert "on the calibration split, no better than always answering" in result.stderr
    for note in report["notes"]:
        assert f"note: {note}" in result.stdout


def test_moves_option_sets_the_moves_in_order():
    from archtree_cli.main import build_parser, settings_from

    base = ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
            "--out", "x"]  # fmt: skip
    chosen = settings_from(build_parser().parse_args([*base, "--moves", "latency, uniform"]))
    assert chosen.move_kinds == ("latency", "uniform")
    default = settings_from(build_parser().parse_args(base))
    assert default.move_kinds == ("global", "latency", "uniform", "focused")


# A value other than the default for every search option of `archtree prune`.
CHANGED_SEARCH_OPTIONS = {
    "--strategy": "greedy",
    "--width": "2",
    "--branching": "2",
    "--planned-steps": "2",
    "--max-depth": "4",
    "--moves": "global,uniform",
    "--ft-steps": "7",
    "--bn-samples": "64",
    "--select-top": "2",
    "--select-steps": "9",
    "--fill-probes": "3",
    "--final-epochs": "0.5",
    "--round-to": "4",
    "--widen-to": "0",
    "--min-width": "0.2",
    "--margin": "0.05",
    "--max-cut": "0.3",
    "--importance": "taylor",
    "--seed": "3",
}


def test_options_the_strategy_overrides_are_named(capsys):
    from archtree_cli.main import build_parser

    base = ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
            "--out", "x", "--strategy"]  # fmt: skip
    parser = build_parser()
    settings = settings_of(parser, [*base, "uniform", "--width", "8", "--moves", "global"])
    assert (settings.width, settings.move_kinds) == (1, ("uniform",))
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "archtree: note: --width 8 is not used: --strategy uniform runs with 1",
        "archtree: note: --moves global is not used: --strategy uniform runs with uniform",
    ]
    settings_of(parser, [*base, "greedy"])  # only defaults overridden: nothing to say
    assert capsys.readouterr().err == ""
    # An option given at its default value is still the user's choice.
    default_width = str(SearchSettings().width)
    settings_of(parser, [*base, "greedy", "--width", default_width, "--seed", "0"])
    assert capsys.readouterr().err.splitlines() == [
        f"archtree: note: --width {default_width} is not used: --strategy greedy runs with 1"
    ]


def test_submit_sends_every_search_option_prune_takes():
    from archtree_cli.main import build_parser
    from archtree_cli.service_commands import submitted_search

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    group = next(g for g in prune._action_groups if g.title == "search")
    options = {action.option_strings[0] for action in group._group_actions}
    assert options == set(CHANGED_SEARCH_OPTIONS)

    base = ["submit", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%"]
    # Options left out take the service's defaults, which are prune's.
    assert submitted_search(parser.parse_args(base)) == {}
    for option, value in CHANGED_SEARCH_OPTIONS.items():
        changed = submitted_search(parser.parse_args([*base, option, value]))
        assert len(changed) == 1, f"archtree submit does not send {option} alone: {changed}"
        assert json.loads(json.dumps(changed)) == changed
    # As given, not as the strategy runs them: the service names what the strategy overrides.
    greedy = parser.parse_args([*base, "--strategy", "greedy", "--width", "3"])
    assert submitted_search(greedy) == {"strategy": "greedy", "width": 3}


def settings_of(parser, argv: list[str]):
    from archtree_cli.main import settings_from

    return settings_from(parser.parse_args(argv))


@pytest.mark.parametrize(
    ("option", "field", "default"),
    [("--fill-probes", "fill_probes", 12), ("--bn-samples", "bn_samples", 512)],
)
def test_a_count_option_has_its_default_turns_off_at_zero_and_cannot_be_negative(
    option: str, field: str, default: int
) -> None:
    from archtree_cli.main import build_parser, settings_from
    from search.errors import ArchtreeError
    from search.settings import SearchSettings

    base = ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
            "--out", "x"]  # fmt: skip
    assert getattr(settings_from(build_parser().parse_args(base)), field) == default
    off = settings_from(build_parser().parse_args([*base, option, "0"]))
    assert getattr(off, field) == 0
    with pytest.raises(ArchtreeError, match=f"{option} cannot be negative"):
        SearchSettings(**{field: -1}).validate()


@pytest.mark.slow
def test_uniform_baseline_runs_through_the_same_engine_and_quiet_prints_only_the_summary(
    tmp_path, home
):
    strategy = "uniform"
    out = tmp_path / strategy
    result = archtree(
        "prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", REACHABLE,
        "--strategy", strategy, "--out", str(out), *FAST, "--quiet", home=home,
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    # --quiet: the summary alone, with the notes, the strategy's among them, as in the report.
    assert result.stderr == ""
    assert result.stdout.startswith(" " * 16 + " " * 9 + "unpruned"), result.stdout
    note = "--width 2 is not used: --strategy uniform runs with 1"
    assert note in report["notes"] and f"note: {note}" in result.stdout
    assert report["search"]["strategy"] == strategy
    assert report["search"]["width"] == 1
    assert report["final"]["latency_ms"] <= report["budget_ms"]
    moves = [n["move"] for n in report["tree"] if n["move"]]
    # Uniform steps; only a confirmation that lands above budget adds trims after them.
    searched = moves[: len(moves) - report["final"]["trims"]]
    assert searched and set(searched) == {"uniform"}


def test_a_saved_search_that_cannot_be_read_is_said_and_started_afresh(
    tmp_path, monkeypatch, capsys
):
    import argparse

    from archtree_cli.commands import _saved_search

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path))
    args = argparse.Namespace(
        model="builtin:vgg", weights=None, allow_pickle=False, data="builtin:digits",
        num_classes=None, budget="50%", device="local", batch_size=1, threads=1, restart=False,
    )  # fmt: skip
    first = _saved_search(args, SearchSettings())
    (first.folder / "state.json").write_text('{"nodes": {"n0"')
    (first.folder / "about.json").write_text("{}")
    first.release()

    again = _saved_search(args, SearchSettings())
    said = capsys.readouterr().err
    assert f"the search an earlier run of this command saved in {again.folder}" in said
    assert "cannot be read (the file is damaged): it starts afresh" in said
    assert not (again.folder / "state.json").exists()
    again.release()
    _saved_search(args, SearchSettings()).release()  # nothing saved now: nothing to say
    assert capsys.readouterr().err == ""


def test_a_model_whose_code_changed_is_another_search(tmp_path, monkeypatch):
    import argparse

    from archtree_cli.commands import _saved_search
    from search.code_identity import _identity

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path / "home"))
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "edited.py").write_text("from torch import nn\n\nnet = nn.Linear\n")
    args = argparse.Namespace(
        model="module:edited:net", weights=None, allow_pickle=False, data="builtin:digits",
        num_classes=None, budget="50%", device="local", batch_size=1, threads=1, restart=False,
    )  # fmt: skip

    def folder() -> Path:
        _identity.cache_clear()  # as a new run of the command reads it anew
        saved = _saved_search(args, SearchSettings())
        saved.release()
        return saved.folder

    first = folder()
    assert folder() == first
    (tmp_path / "edited.py").write_text("from torch import nn\n\nnet = nn.Bilinear\n")
    assert folder() != first


@pytest.mark.slow
def test_width_one_equals_greedy_and_timings_from_the_cache_are_said_to_be(tmp_path, home):
    common = ["--model", "builtin:vgg", "--data", "builtin:digits", "--budget", REACHABLE, *FAST]
    cache = ["--cache-dir", str(tmp_path / "cache")]

    def timed(result: subprocess.CompletedProcess) -> list[str]:
        lines = [line.split("] ", 1)[1] for line in result.stderr.splitlines() if "] " in line]
        return [line for line in lines if line.startswith(("baseline ", "confirmed "))]

    first = archtree("prune", *common, *cache, "--strategy", "greedy", "--out",
                     str(tmp_path / "g"), home=home)  # fmt: skip
    again = archtree("prune", *common, *cache, "--width", "1", "--out", str(tmp_path / "w"),
                     home=home)  # fmt: skip
    greedy = json.loads((tmp_path / "g" / "report.json").read_text())
    width_one = json.loads((tmp_path / "w" / "report.json").read_text())
    # The same search again: every timing comes from the cache, the confirmation's included,
    # and the progress and the counts say so; but for the unpruned model's, which anchors
    # them all and is timed afresh by each new search.
    assert len(timed(first)) == 2 and not any("cached" in line for line in timed(first))
    baseline, confirmed = timed(again)
    assert ", cached)" not in baseline and ", cached)" in confirmed
    assert width_one["search"]["latency_measurements"] == 1
    first_total = greedy["search"]["latency_measurements"] + greedy["search"]["cache_hits"]
    assert width_one["search"]["cache_hits"] == first_total - 1

    def shape(report):
        return [(n["id"], n["parent"], n["move"], n["arch_hash"]) for n in report["tree"]]

    assert greedy["search"]["strategy"] == "greedy"
    assert greedy["search"]["width"] == width_one["search"]["width"] == 1
    assert greedy["final"]["latency_ms"] <= greedy["budget_ms"]
    assert "global" in {n["move"] for n in greedy["tree"] if n["move"]}
    assert shape(greedy) == shape(width_one)
    assert greedy["final"]["arch_hash"] == width_one["final"]["arch_hash"]


def sequences_file(path: Path, count: int = 240, labelled: bool = True) -> Path:
    """Sequences of 4 channels and 48 steps, N,C,L, whose class is the channel that is high;
    labelled or not."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(count) % 3
    x = 0.1 * torch.randn(count, 4, 48, generator=generator)
    x[torch.arange(count), labels] += 1.0
    torch.save({"x": x, "y": labels} if labelled else {"x": x}, path)
    return path


@pytest.mark.slow
def test_a_model_of_sequences_is_pruned_data_free_and_the_run_says_its_scores_are_fidelity(
    tmp_path, home
):
    from search import load_pruned

    data = sequences_file(tmp_path / "sequences.pt", labelled=False)
    source = "module:tests.non_image_models:sequence_net"
    args = prune_args(tmp_path, "--model", source, "--data", str(data), "--select-steps", "5",
                      "--fill-probes", "0", "--width", "1", "--branching", "2",
                      budget="90%")  # fmt: skip
    result = archtree(*args, home=home)

    # Without labels, every score is fidelity to the unpruned model's outputs, said once.
    assert re.search(r"\] baseline .* fidelity 0\.0000; budget", result.stderr), result.stderr
    assert result.stderr.count("candidates are scored by fidelity to the unpruned model") == 1
    assert re.search(r"\] +\[1/\d+\] .* fidelity -?\d", result.stderr), result.stderr
    assert " score " not in result.stderr
    evaluating = (
        r"depth 1 of at most \d+: evaluating \d+ child(ren)? \(each pruned .*, fine-tuned 5 "
        r"steps, scored"
    )
    assert re.search(evaluating, result.stderr), result.stderr
    fidelity = json.loads((tmp_path / "out" / "report.json").read_text())["final"]["fidelity"]
    assert fidelity <= 0.0
    row = next(line for line in result.stdout.splitlines() if line.startswith("fidelity (val)"))
    assert row.split()[-1] == f"{fidelity:.4f}"
    assert "fidelity: how close the pruned model's outputs stay" in result.stdout
    # The sequences were taken as N,C,L, which the pruned model takes too.
    pruned = load_pruned(tmp_path / "out")
    assert pruned(torch.zeros(2, 4, 48)).shape == (2, 3)
    assert pruned[3].out_channels < 128 or pruned[6].out_channels < 128
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert json.loads((tmp_path / "out" / "arch.json").read_text())["input_shape"] == [4, 48]
    assert report["final"]["latency_ms"] <= report["budget_ms"] < report["baseline"]["latency_ms"]


@pytest.mark.slow
def test_a_text_model_is_pruned_timed_and_measured_on_token_ids(tmp_path, home):
    from search import load_pruned
    from search.model_source import save_weights
    from tests.non_image_models import token_data, trained_token_conv_net

    save_weights(trained_token_conv_net(), tmp_path / "text.safetensors")
    x, y = token_data()
    np.savez(tmp_path / "tokens.npz", x=x.numpy(), y=y.numpy())
    args = prune_args(tmp_path, "--model", "module:tests.non_image_models:token_conv_net",
                      "--weights", str(tmp_path / "text.safetensors"),
                      "--data", str(tmp_path / "tokens.npz"), "--width", "1",
                      "--branching", "2", "--select-steps", "5")  # fmt: skip
    result = archtree(*args, home=home)

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    arch = json.loads((tmp_path / "out" / "arch.json").read_text())
    assert arch["input_shape"] == [64] and arch["token_range"] == 100
    assert report["final"]["latency_ms"] <= report["budget_ms"] < report["baseline"]["latency_ms"]
    # Fine-tuned and scored on the token ids: the keywords are still found.
    assert report["final"]["accuracy"] >= 0.9, result.stdout
    pruned = load_pruned(tmp_path / "out")
    assert pruned.convs[0].out_channels < 192 or pruned.convs[3].out_channels < 192
    assert pruned(token_data(samples=6, seed=1)[0]).shape == (6, 3)
    # The result is measured on token ids too, as is the unpruned model of its code.
    measured = archtree("measure", "--model", str(tmp_path / "out"), home=home)
    assert "setup      batch 1, input (64,) of token ids below 100, 1 thread(s)" in measured.stdout
    unpruned = archtree("measure", "--model", "module:tests.non_image_models:token_conv_net",
                        "--input-shape", "64", home=home)  # fmt: skip
    assert "input (64,) of token ids below 100" in unpruned.stdout


@pytest.mark.slow
def test_a_transformer_on_token_ids_is_narrowed_with_its_embedding(tmp_path, home):
    from search import load_pruned
    from tests.non_image_models import token_data

    x, y = token_data()
    np.savez(tmp_path / "tokens.npz", x=x.numpy(), y=y.numpy())
    # A small transformer's fixed costs keep its smallest pruned form near 80 % of it.
    args = prune_args(tmp_path, "--model", "module:tests.non_image_models:token_transformer",
                      "--data", str(tmp_path / "tokens.npz"), "--width", "1",
                      "--branching", "1", "--select-steps", "2", "--fill-probes", "0",
                      "--moves", "uniform", budget="90%")  # fmt: skip
    archtree(*args, home=home)

    pruned = load_pruned(tmp_path / "out")
    stream = json.loads((tmp_path / "out" / "arch.json").read_text())["layers"]["encoder.norm1"]
    # The residual stream, the embedding's width among it, was narrowed as one.
    assert pruned.embedding.embedding_dim == stream[0] < 64
    assert pruned(token_data(samples=4, seed=1)[0]).shape == (4, 3)


def test_token_ids_go_as_integers_to_a_model_that_looks_its_inputs_up(tmp_path):
    from search.errors import ArchtreeError
    from search.inputs import load_inputs
    from tests.non_image_models import token_data

    x, y = token_data(samples=300)
    source = "module:tests.non_image_models:token_conv_net"
    for name, ids in [("int.npz", x.numpy()), ("float.npz", x.numpy().astype(np.float32))]:
        np.savez(tmp_path / name, x=ids, y=y.numpy())
        taken = load_inputs(source, str(tmp_path / name)).data
        assert taken.token_range == 100 and taken.input_shape == (64,)
        assert taken.calib_x.dtype == torch.int64
        rows = torch.cat([taken.train_x, taken.calib_x, taken.val_x])
        assert torch.equal(torch.unique(rows, dim=0), torch.unique(x, dim=0))  # the same ids
    # Ids no embedding of the model can look up: its vocabulary is not the data's.
    np.savez(tmp_path / "wide.npz", x=(x * 2).numpy(), y=y.numpy())
    with pytest.raises(ArchtreeError) as error:
        load_inputs(source, str(tmp_path / "wide.npz"))
    assert str(error.value) == (
        f"{tmp_path / 'wide.npz'} holds token ids up to 198, but the largest embedding of the "
        f"model {source} has 100 entries (ids 0..99): give data tokenized with the model's "
        "own vocabulary, or weights for a model of that vocabulary's size."
    )
    # What cannot be token ids is named: a padding id of -1, a value that is no whole number.
    not_ids = [("pad.npz", -1, "one is -1, and ids are 0 and up"),
               ("half.npz", 2.5, "one is 2.5, and ids are whole numbers")]  # fmt: skip
    for name, value, why in not_ids:
        ids = x.numpy().astype(np.float32)
        ids[7, 3] = value
        np.savez(tmp_path / name, x=ids, y=y.numpy())
        with pytest.raises(ArchtreeError) as error:
            load_inputs(source, str(tmp_path / name))
        assert f"{tmp_path / name}'s inputs are not token ids ({why}): save them as integers" in (
            str(error.value)
        )
    # Whole numbers, for a model whose embedding is its own: they stay floats.
    counts = torch.randint(0, 256, (300, 12))
    np.savez(tmp_path / "counts.npz", x=counts.numpy(), y=(torch.arange(300) % 3).numpy())
    taken = load_inputs(
        "module:tests.non_image_models:features_with_embedded_positions",
        str(tmp_path / "counts.npz"),
    ).data
    assert taken.token_range is None and taken.calib_x.dtype == torch.float32


def test_inputs_that_are_not_images_go_to_a_model_that_takes_them_and_no_builtin(tmp_path):
    from search.errors import ArchtreeError
    from search.inputs import load_inputs

    sequences = str(sequences_file(tmp_path / "sequences.pt"))
    taken = load_inputs("module:tests.non_image_models:sequence_net", sequences)
    assert taken.data.input_shape == (4, 48) and taken.data.calib_x.shape[1:] == (4, 48)
    features = tmp_path / "features.pt"
    torch.save({"x": torch.randn(240, 12), "y": torch.arange(240) % 3}, features)
    taken = load_inputs("module:tests.non_image_models:feature_net", str(features))
    assert taken.data.input_shape == (12,)
    # A model that takes neither form is told about both.
    with pytest.raises(ArchtreeError) as error:
        load_inputs("module:tests.non_image_models:feature_net", sequences)
    message = str(error.value)
    assert message.startswith("the model module:tests.non_image_models:feature_net rejects")
    assert "of shape (1, 4, 48)" in message
    assert "read as N,C,L sequences of shape (4, 48)" in message
    with pytest.raises(ArchtreeError, match="builtin:resnet takes images, and a sample of"):
        load_inputs("builtin:resnet", str(features))


def test_labels_that_do_not_fit_a_models_own_outputs_are_told_what_to_give(tmp_path):
    from search.errors import ArchtreeError
    from search.inputs import load_inputs

    source = "module:tests.non_image_models:feature_net"  # 3 outputs
    for labels, said in [
        # Numbered from 1: the model's classes are 0..2.
        (torch.arange(240) % 3 + 1, "the labels of {} run from 1 to 3, and the model {source} "
         "outputs 3 classes, numbered 0 to 2: save the labels less one (y - 1)."),
        # More classes than the model has: no weights change a module:'s outputs.
        (torch.arange(240) % 5, "{} has 5 classes but the model {source} outputs 3: give data "
         "labelled 0 to 2, or a model with 5 outputs."),
    ]:  # fmt: skip
        features = tmp_path / "features.pt"
        torch.save({"x": torch.randn(240, 12), "y": labels}, features)
        with pytest.raises(ArchtreeError) as error:
            load_inputs(source, str(features))
        assert str(error.value) == said.format(features, source=source)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_result_written_into_out_during_the_search_is_kept(overwrite, tmp_path, home):
    """--overwrite replaces the result found in --out at the start, not one another run
    writes there meanwhile: that one was lost, both runs saying they had saved theirs."""
    out = tmp_path / "out"
    if overwrite:
        out.mkdir()
        (out / "report.json").write_text('{"from": "before"}')
    env = {**os.environ, "ARCHTREE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    # The smallest search: what is checked is where its result goes.
    args = prune_args(tmp_path, "--model", "builtin:vgg", "--width", "1", "--branching", "1",
                      "--select-steps", "2", "--fill-probes", "0",
                      *(["--overwrite"] if overwrite else []))  # fmt: skip
    search = subprocess.Popen(
        [sys.executable, "-m", "archtree_cli.main", *args],
        stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    lines = []
    for line in search.stderr:  # the search has started, past the check of --out
        lines.append(line)
        if "depth 1" in line:
            break
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text('{"from": "another run"}')
    _, rest = search.communicate(timeout=600)
    assert search.returncode == 0, "".join(lines) + rest
    assert (out / "report.json").read_text() == '{"from": "another run"}'
    assert json.loads((tmp_path / "out-2" / "report.json").read_text())["final"]
    assert f"this one is saved to {tmp_path / 'out-2'}" in rest


def test_a_result_is_replaced_only_when_it_is_the_one_found_at_the_start(tmp_path, capsys):
    """A demo replaces the earlier demo it found in --out; one written there while it ran
    (a prune's, say) is kept, and the demo's goes beside it."""
    from archtree_cli.commands import result_folder, result_snapshot

    out = tmp_path / "out"
    assert result_snapshot(out) is None
    assert result_folder(out, overwrite=False, replaces=None) == out
    out.mkdir()
    (out / "report.json").write_text('{"inputs": {"command": "demo"}}')
    found = result_snapshot(out)
    assert result_folder(out, overwrite=False, replaces=found) == out
    (out / "report.json").write_text('{"inputs": {"command": "prune"}, "longer": true}')
    assert result_snapshot(out) != found
    assert result_folder(out, overwrite=False, replaces=found) == tmp_path / "out-2"
    assert "received another result while this search ran" in capsys.readouterr().err
    assert result_folder(out, overwrite=True, replaces=found) == out


def test_demo_replaces_only_an_earlier_demo(tmp_path, home):
    folder = tmp_path / "result"
    folder.mkdir()
    from archtree_cli.commands import _holds_a_demo

    report = {"inputs": {"command": "prune", "model": "builtin:resnet", "data": "builtin:mnist"}}
    (folder / "report.json").write_text(json.dumps(report))
    refused = archtree("demo", "--out", str(folder), home=home, check=False)
    assert "already holds a result" in one_line_error(refused)
    assert not _holds_a_demo(folder)
    report["inputs"]["command"] = "demo"
    (folder / "report.json").write_text(json.dumps(report))
    assert _holds_a_demo(folder) and not _holds_a_demo(tmp_path / "nothing-here")
    assert "training" not in refused.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    no_home = archtree("demo", "--out", str(tmp_path / "d"), home=blocker, check=False)
    assert "cannot write to ARCHTREE_HOME's" in one_line_error(no_home)
    bad_budget = archtree("demo", "--budget", "soon", "--out", str(tmp_path / "d"), home=home,
                          check=False)  # fmt: skip
    assert "cannot read the budget" in one_line_error(bad_budget)
    assert "training" not in bad_budget.stderr


def test_the_searchs_advice_to_the_demo_says_which_options_are_prunes():
    from archtree_cli.commands import in_demo_terms

    advice = "Give a budget of at least 0.436 ms, or lower --min-width or --round-to."
    assert in_demo_terms(advice) == (
        "Give a budget of at least 0.436 ms, or lower --min-width or --round-to (--min-width, "
        "--round-to: options of archtree prune, which runs this search on builtin:resnet with "
        "the demo's weights, or on a model of your own)."
    )
    # Advice in the demo's own options stays as it is.
    assert in_demo_terms("give another --out, or --overwrite.") == (
        "give another --out, or --overwrite."
    )


def test_a_demo_stopped_while_training_says_so_and_keeps_no_weights(tmp_path):
    home = tmp_path / "home"
    process = started_archtree(["demo", "--out", str(tmp_path / "demo")], home)
    lines = StderrLines(process)
    try:
        lines.until("training the demo model")
        process.terminate()
        process.wait(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, lines.rest()
    assert lines.rest().strip().splitlines()[-1] == (
        f"archtree: terminated: nothing was written to {tmp_path / 'demo'}; the demo model was "
        "not trained to the end, and the next `archtree demo` trains it from the start"
    )
    assert not list((home / "demo").glob("*"))


def test_demo_weights_are_cached_whole_or_not_at_all(tmp_path, monkeypatch):
    import search.model_source
    import search.training
    from archtree_cli.commands import demo_weights

    def stopped_while_saving(model, path) -> None:
        Path(path).write_bytes(b"the first bytes of the weights")
        raise KeyboardInterrupt

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path))
    monkeypatch.setattr(search.training, "train", lambda *args, **kwargs: None)
    monkeypatch.setattr(search.model_source, "save_weights", stopped_while_saving)
    with pytest.raises(KeyboardInterrupt):
        demo_weights(progress=lambda text: None)
    assert not list((tmp_path / "demo").glob("*"))  # no partial weights to load next time
    monkeypatch.undo()
    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path))
    monkeypatch.setattr(search.training, "train", lambda *args, **kwargs: None)
    path = demo_weights(progress=lambda text: None)
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [path.name]
    from safetensors.torch import load_file

    assert "classifier.weight" in load_file(path)


@pytest.mark.parametrize("damage", [b"", b"\x00" * 3000])
def test_cached_demo_weights_that_cannot_be_used_are_trained_again(tmp_path, monkeypatch, damage):
    """They told the user to save again weights the user never saved."""
    import search.training
    from archtree_cli.commands import demo_weights

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path))
    monkeypatch.setattr(search.training, "train", lambda *args, **kwargs: None)
    cached = tmp_path / "demo" / "resnet-mnist.safetensors"
    cached.parent.mkdir()
    cached.write_bytes(damage)
    said: list[str] = []
    assert demo_weights(progress=said.append) == cached
    assert said[0].startswith("the cached demo model cannot be used (")
    assert said[0].endswith("); it is trained again")
    from safetensors.torch import load_file

    assert "classifier.weight" in load_file(cached)
    said.clear()
    assert demo_weights(progress=said.append) == cached and not said  # used as it is now


def wait_for_a_timing_process(process: subprocess.Popen[str]) -> None:
    """Until the command times a model: timings run in children of the fork server, a child
    of the command."""
    command = psutil.Process(process.pid)

    def timing() -> bool:
        try:
            return any(child.ppid() != process.pid for child in command.children(recursive=True))
        except psutil.NoSuchProcess:
            return False

    wait_until(timing, 120, "a timing process", poll_s=0.01)


def test_ctrl_c_during_a_timing_says_what_was_kept_without_a_traceback(tmp_path, home):
    out = tmp_path / "out"
    process = started_archtree(
        ["prune", "--model", "builtin:resnet", "--data", "builtin:digits", "--budget", "50%",
         "--out", str(out)],
        home,
        start_new_session=True,  # a group of its own, as a terminal's foreground job
    )  # fmt: skip
    try:
        wait_for_a_timing_process(process)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert f"archtree: interrupted: nothing was written to {out}" in stderr
    assert not out.exists()


def processes_of(home: Path) -> list[psutil.Process]:
    """The processes whose environment names `home` as ARCHTREE_HOME: a command's, and its
    children's, re-parented or not."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("ARCHTREE_HOME") == str(home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_sigterm_during_a_timing_stops_every_process_the_command_started(tmp_path):
    home = tmp_path / "home"  # marks this command's processes
    process = started_archtree(
        ["measure", "--model", "builtin:resnet", "--input-shape", "3,224,224", "--batch-size", "4"],
        home,
    )
    try:
        wait_for_a_timing_process(process)
        process.terminate()  # SIGTERM to the command alone, as `kill PID` or `timeout` send
        _stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1].startswith("archtree: terminated"), stderr
    assert "Traceback" not in stderr, stderr
    wait_until(lambda: not processes_of(home), 15, "the timing processes to stop")


def test_the_command_lines_job_statuses_are_the_services():
    from archtree_cli.client import ENDED
    from archtree_cli.service_commands import JOB_STATUSES
    from workers.job_store import FINAL_STATUSES, STATUSES

    assert (JOB_STATUSES, ENDED) == (STATUSES, FINAL_STATUSES)


def test_counts_are_singular_for_one():
    assert counted(1, "measurement") == "1 measurement"
    assert [counted(n, "candidate") for n in (0, 2)] == ["0 candidates", "2 candidates"]


def test_debug_is_taken_after_the_command_too(home):
    result = archtree("models", "--debug", home=home)
    assert "builtin:vgg" in result.stdout


@pytest.mark.slow
def test_unreachable_budget_reports_the_best_reachable_latency(tmp_path, home):
    args = prune_args(tmp_path, "--min-width", "0.5", budget="3%")
    line = one_line_error(archtree(*args, home=home, check=False))
    assert "cannot be met" in line and "smallest model pruning can reach measures" in line


def test_a_budget_far_below_the_smallest_model_is_shown_unrounded_without_the_margin_hint(
    tmp_path, home
):
    line = one_line_error(
        archtree(*prune_args(tmp_path, budget="0.0001ms"), home=home, check=False)
    )
    assert "the budget of 0.0001 ms cannot be met" in line
    assert "over the budget itself" in line and line.endswith("or lower --min-width.")
    assert "margin" not in line


def test_models_lists_three_families(home):
    result = archtree("models", home=home)
    for name in ("builtin:vgg", "builtin:resnet", "builtin:mobilenetv2"):
        assert name in result.stdout
    header, *rows = result.stdout.splitlines()
    # A table: every row's description starts under the header's.
    starts = {re.search(r"\d[\d,]*  ", row).end() for row in rows}
    assert starts == {header.index("description")}, result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_device_without_a_gpu_says_so(tmp_path, home):
    line = one_line_error(archtree(*prune_args(tmp_path, "--device", "local:cuda"), home=home,
                                   check=False))  # fmt: skip
    assert "CUDA" in line and "--device local" in line


def test_replayed_service_events_are_stamped_when_they_happened():
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    progress.emit("queued", time=1000.0)
    progress.emit("note", message="first", time=1002.5)
    progress.emit("note", message="second", time=1010.0)
    stamps = [line.split("]")[0].strip("[ s") for line in stream.getvalue().splitlines()]
    assert stamps == ["2.5", "10.0"]


def test_a_depths_lines_say_how_deep_it_may_go_and_the_time_it_has_left():
    """Replayed service events carry their times: 40 s a child, 3 children to go."""
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    node = {"within_budget": True, "latency_ms": 1.0, "score": 0.9, "filled_from": None}
    progress.emit("depth_started", depth=2, children=4, ft_steps=20, max_depth=6, time=1000.0)
    progress.emit("node", id="n5", move="global", time=1040.0, **node)
    progress.emit("node", id="n6", move="uniform", time=1050.0, **node)
    progress.emit("node", id="n7", move="latency", time=1070.0, **node)
    progress.emit("node", id="n8", move="focused:a", time=1080.0, **node)
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines[0].startswith("depth 2 of at most 6: evaluating 4 children")
    assert lines[1].endswith("score 0.9000; about 2 min left in depth")  # 40 s each, 3 more
    assert lines[2].endswith("score 0.9000; about 50 s left in depth")  # 25 s each, 2 more
    assert lines[3].endswith("score 0.9000")  # 23 s for the last one: not worth saying
    assert lines[4].endswith("score 0.9000")  # the depth's last


def test_a_stall_in_a_depth_is_not_taken_for_the_pace_of_its_children():
    """10 s a child, then 3 min with none (Redis restarting): 3 children to go take about
    half a minute, not the 3 min a pace of 200 s for 3 children would say."""
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    node = {"within_budget": True, "latency_ms": 1.0, "score": 0.9, "filled_from": None}
    progress.emit("depth_started", depth=1, children=6, time=1000.0)
    for number, at in enumerate((1010.0, 1020.0, 1200.0), start=1):
        progress.emit("node", id=f"n{number}", move="global", time=at, **node)
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines[-1].endswith("score 0.9000; about 30 s left in depth"), lines[-1]


def test_the_pace_of_a_depth_leaves_out_stalls_and_follows_children_in_parallel():
    from archtree_cli.progress import pace_s

    assert pace_s([40.0]) == 40.0
    assert pace_s([10.0, 10.0, 180.0]) == 10.0  # the stall left out
    assert pace_s([40.0, 1.0, 39.0, 1.0]) == 20.25  # two workers: two children per 40 s
    assert pace_s([40.0, 0.0, 0.0]) == 40.0 / 3  # three at once: the plain mean


def test_a_child_evaluated_again_is_said_as_such_not_counted_twice():
    """`status --watch` printed a child's second run as another child, labelled [end]."""
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    node = {"within_budget": False, "latency_ms": 1.0, "score": 0.9, "filled_from": None}
    progress.emit("depth_started", depth=1, children=2, ft_steps=5, time=1000.0)
    progress.emit("child_started", id="n1", depth=1, time=1000.0)
    progress.emit("node", id="n1", move="global", time=1010.0, **node)
    progress.emit("child_started", id="n1", depth=1, run=2, time=1030.0)
    progress.emit("node", id="n1", move="global", time=1040.0, **node)
    progress.emit("node", id="n2", move="latency", time=1050.0, **node)
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines[1].startswith("  [1/2]   n1 global")
    assert lines[2] == "    n1 evaluating again (run 2: an earlier run was cut short)"
    assert lines[3].startswith("  [again]   n1 global")
    assert lines[4].startswith("  [2/2]   n2 latency")


def test_progress_lines_say_what_happens_in_the_order_that_matters():
    stream = io.StringIO()
    progress = ConsoleProgress(stream)
    node = {"within_budget": True, "latency_ms": 1.0, "score": 0.9, "filled_from": None}
    progress.emit("depth_started", depth=1, children=1, ft_steps=20)
    progress.emit("node", id="n1", move="global", **node)
    progress.emit("depth_started", depth=2, children=2, ft_steps=20)
    progress.emit("reranked", steps=100, nodes=[
        {"id": "n14", "score_before": 0.9, "score": 0.938},
        {"id": "n17", "score_before": 0.9, "score": 0.940},
        {"id": "n13", "score_before": 0.9, "score": 0.944},
    ])  # fmt: skip
    progress.emit("node", id="n9", move="global", **{**node, "filled_from": "n5"})
    progress.emit("final_finetune", epochs=1.0)
    progress.emit("depth_done", depth=3, frontier=[], best=None)
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    # What evaluating means is said once: each child takes seconds and prints when done.
    assert lines[0].startswith("depth 1: evaluating 1 child (each pruned to its target")
    assert "fine-tuned 20 steps" in lines[0]
    assert lines[2] == "depth 2: evaluating 2 children"
    assert lines[3].endswith("steps: n13 0.9440, n17 0.9400, n14 0.9380")  # best first
    assert "n9 n5 widened to fill" in lines[4] and "global" not in lines[4]
    assert lines[5] == "final fine-tune: 1 epoch with distillation"
    assert lines[6] == "depth 3 done: frontier empty (no new candidate); none within budget yet"
    # A widened answer's gap to the answer: points of accuracy, a plain difference of fidelity.
    filled = {
        "id": "n20", "answer": "n19", "groups": ["stage1"], "latency_ms": 0.95,
        "answer_latency_ms": 0.9, "score": 0.905, "answer_score": 0.9, "chosen": "n20",
        "score_gap": 0.005, "score_gap_se": 0.002,
    }  # fmt: skip
    progress.emit("filled", **filled)
    assert (
        stream.getvalue()
        .splitlines()[-1]
        .endswith("(was 0.9000; +0.5 +- 0.4 points): n20 is the answer")
    )
    data_free = ConsoleProgress(io.StringIO())
    data_free.emit("baseline", latency_ms=1.0, timing={"cv": 0.01}, score=0.0, budget_ms=0.8,
                   scored_by="fidelity")  # fmt: skip
    data_free.emit("filled", **{**filled, "score": -0.004, "answer_score": -0.005})
    said = data_free.stream.getvalue().splitlines()[-1]
    assert said.endswith("(was -0.0050; +0.0050 +- 0.0040): n20 is the answer"), said


def test_the_help_examples_parse_as_given():
    from archtree_cli.main import MAIN_EXAMPLES, PRUNE_EXAMPLES, build_parser

    examples = []
    for text in (MAIN_EXAMPLES, PRUNE_EXAMPLES):
        joined = re.sub(r"\\\n\s*", "", text)
        for line in joined.splitlines():
            if line.strip().startswith("archtree ") and "..." not in line:
                # The command is what stands before a run of spaces and the comment.
                examples.append(re.split(r"\s{3,}", line.strip())[0].split()[1:])
    assert len(examples) >= 6
    parser = build_parser()
    for words in examples:
        parsed = parser.parse_args(words)  # exits with the usage error otherwise
        assert parsed.command == words[0]


def test_help_shows_examples(tmp_path: Path):
    finished = run_archtree("--help", home=tmp_path)
    assert finished.returncode == 0
    assert "examples:" in finished.stdout and "archtree prune --model" in finished.stdout


def test_output_to_a_closed_pipe_or_a_full_disk_is_no_internal_error(tmp_path: Path):
    command = [sys.executable, "-m", "archtree_cli.main", "models"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ARCHTREE_HOME": str(tmp_path)}
    # The reader is gone before the command writes (`archtree models | head -0`).
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 141, stderr
    assert stderr.decode() == ""

    with open("/dev/full", "w") as full:
        finished = subprocess.run(
            command, cwd=ROOT, env=env, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert finished.returncode == 2
    assert finished.stderr.startswith("archtree: error: no space left")
    assert "internal error" not in finished.stderr and "Exception" not in finished.stderr


def test_the_summary_says_when_the_answer_was_trimmed_after_the_search(capsys):
    from archtree_cli.commands import print_summary

    side = {"latency_ms": 0.3, "accuracy": 0.9, "params": 1000, "macs": 2000.0}
    search = {"strategy": "archtree", "depths": 0, "candidates_evaluated": 0,
              "latency_measurements": 4, "cache_hits": 7, "wall_s": 3.0}  # fmt: skip
    # An unpruned model far under its budget: its share is said, not rounded to 0.0 %.
    far_under = {**side, "budget_fit": 0.00025, "trims": 0}
    print_summary({"baseline": side, "final": far_under, "search": search, "budget_ms": 1e-6}, "o")
    assert "budget 1e-06 ms, final at 0.025% of it;" in capsys.readouterr().out
    for trims, said in ((0, None), (1, "trimmed 1 time after"), (2, "trimmed 2 times after")):
        final = {**side, "budget_fit": 0.98, "trims": trims}
        print_summary({"baseline": side, "final": final, "search": search, "budget_ms": 0.3}, "o")
        printed = capsys.readouterr().out
        # Timings from the cache are not among the measurements: counted apart from them.
        assert (
            "archtree searched 0 depths, 0 candidates, 4 measurements (and 7 taken from the "
            "latency cache) in 3 s"
        ) in printed
        assert ("trimmed" in printed) == (said is not None)
        assert said is None or f"the answer was {said} it measured over the budget" in printed
    # None from the cache: none said.
    final = {**side, "budget_fit": 0.98, "trims": 0}
    uncached = {**search, "cache_hits": 0}
    print_summary({"baseline": side, "final": final, "search": uncached, "budget_ms": 0.3}, "o")
    assert "0 candidates, 4 measurements in 3 s" in capsys.readouterr().out


class StderrLines:
    """A command's stderr, read line by line as it comes by a thread of its own."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, text: str, timeout_s: float = 300) -> str:
        """The first line holding `text`; AssertionError if the output ends before it."""
        while True:
            line = self.lines.get(timeout=timeout_s)
            if line is None:
                raise AssertionError(f"no line holding {text!r} in:\n{''.join(self.seen)}")
            self.seen.append(line)
            if text in line:
                return line

    def rest(self) -> str:
        self.thread.join(timeout=120)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


def test_an_interrupted_prune_is_saved_and_the_same_command_goes_on_from_its_last_depth(
    tmp_path, home
):
    args = [
        "prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", REACHABLE,
        "--out", str(tmp_path / "out"), "--width", "1", "--branching", "1", "--ft-steps", "2",
    ]  # fmt: skip

    def stopped_at(text: str, extra: tuple[str, ...] = ()) -> tuple[str, str]:
        process = started_archtree([*args, *extra], home)
        lines = StderrLines(process)
        try:
            line = lines.until(text)
            process.terminate()
            process.wait(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 143, lines.rest()
        return line, lines.rest()

    # Saved once depth 1 is done, before depth 2 starts.
    _, stderr = stopped_at("depth 2 of at most")
    # Its first line says what the first seconds go to (a large model's take minutes).
    first = "checking builtin:vgg, then timing it unpruned at batch 1: the search starts from"
    assert stderr.splitlines()[0].split("] ", 1)[1] == f"{first} that latency", stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(
            "the search is saved after depth 1, and the same command goes on from there "
            "(--restart starts it afresh)"
        )
    ), stderr
    line, stderr = stopped_at("resuming the search")
    assert "baseline" not in stderr.split("resuming")[0], stderr
    assert stderr.splitlines()[0].split("] ", 1)[1] == "checking builtin:vgg", stderr
    assert "evaluated" in line and line.endswith("going on after depth 1\n"), line
    assert "depth 1 of" not in stderr and "Traceback" not in stderr, stderr
    # --restart measures the unpruned model again instead; stopped, it is not said to go on
    # with the same command, which would clear the search again.
    _, stderr = stopped_at("depth 2 of at most", ("--restart",))
    assert "resuming" not in stderr and "] baseline" in stderr, stderr
    said, progress = stderr.split("\n", 1)
    assert said.startswith("archtree: note: --restart: the search an earlier run"), stderr
    assert progress.splitlines()[0].split("] ", 1)[1].startswith(first), stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .endswith(
            "the search is saved after depth 1, and the same command without --restart goes on "
            "from there"
        )
    ), stderr


def test_every_option_of_every_command_is_in_the_readme():
    from archtree_cli.main import build_parser

    commands = next(
        action for action in build_parser()._actions if action.dest == "command"
    ).choices
    readme = (ROOT / "README.md").read_text()
    mentioned = set(re.findall(r"(--[a-z][a-z0-9-]*)", readme))
    missing = {
        name: sorted(
            option
            for action in parser._actions
            for option in action.option_strings
            if option.startswith("--") and option != "--help" and option not in mentioned
        )
        for name, parser in commands.items()
    }
    assert not any(missing.values()), missing


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # A prefix of one option is no option: --device is measure's and prune's, not agent's.
        (["agent", "--device-class", "edge", "--device", "cuda"],
         "archtree agent: error: unrecognized arguments: --device cuda; --device is an "
         "option of `archtree prune` and `archtree measure`, not of `archtree agent`; did you "
         "mean --device-class? (see archtree agent --help)"),
        (["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x", "--widt", "3"],
         "archtree prune: error: unrecognized arguments: --widt 3; did you mean --width? "
         "(see archtree prune --help)"),
        (["measure", "--model", "builtin:vgg", "--thread=2"],
         "did you mean --threads?"),
        (["models", "--everything"],
         "archtree models: error: unrecognized arguments: --everything (see archtree models "
         "--help)"),
        # An unknown option said beside the missing ones.
        (["prune", "--model", "builtin:vgg", "--widt", "3"],
         "archtree prune: error: the following arguments are required: --data, --budget, "
         "--out; unrecognized arguments: --widt; did you mean --width? (see archtree prune "
         "--help)"),
        # An option before the command.
        (["--width", "3", "prune"],
         "archtree: error: --width given before the command: a command's options go after "
         "it, as in `archtree prune --width 3` (commands: prune, measure,"),
        # An option of another command, carried over: what to do instead, or whose it is.
        (["submit", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x"],
         "archtree submit: error: unrecognized arguments: --out x; a job's result files are "
         "fetched once it is done: `archtree fetch JOB_ID --out DIR`"),
        (["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x", "--api", "http://localhost:8000"],
         "`archtree prune` searches on this machine, with no service; `archtree submit --api "
         "URL` sends the same search to a service"),
        (["submit", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
          "--jobs", "2"],
         "unrecognized arguments: --jobs 2; --jobs is an option of `archtree prune`, not of "
         "`archtree submit`"),
        (["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x", "--input-shape=1,28,28"],
         "--input-shape is an option of `archtree measure`, not of `archtree prune`"),
    ],
)  # fmt: skip
def test_an_unknown_option_is_refused_by_its_command_with_the_closest_option(argv, said, capsys):
    error = refused_usage(argv, capsys)
    assert said in error and len(error.strip().splitlines()) == 1, error


def refused_usage(argv: list[str], capsys) -> str:
    """What the command line parser says as it refuses `argv` with a usage error."""
    from archtree_cli.main import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_value_that_starts_with_a_dash_is_its_options_value():
    """argparse takes `-1,28,28` for an option; a value after an option that takes one, and
    that is no option itself, is the option's value (the command's own checks refuse it)."""
    from archtree_cli.main import build_parser

    parsed = build_parser().parse_args(
        ["measure", "--model", "builtin:vgg", "--input-shape", "-1,28,28"]
    )
    assert parsed.input_shape == "-1,28,28"
    parsed = build_parser().parse_args(
        ["prune", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "-5ms",
         "--out", "x", "--moves", "global"]
    )  # fmt: skip
    assert (parsed.budget, parsed.out, parsed.moves) == ("-5ms", "x", ("global",))


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # An option's value missing: the next option is not taken for it.
        (["measure", "--model", "--threads", "2"],
         "argument --model: expected one argument"),
        (["measure", "--model", "-h"], "argument --model: expected one argument"),
    ],
)  # fmt: skip
def test_an_option_followed_by_another_option_still_lacks_its_value(argv, said, capsys):
    assert said in refused_usage(argv, capsys)


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["measure", "--model", ""],
         "--model is empty: give a model source (is the shell variable it came from unset?)"),
        (["prune", "--model", "builtin:vgg", "--data", " ", "--budget", "60%", "--out", "x"],
         "--data is empty: give builtin:mnist, builtin:digits or a data file"),
        (["prune", "--model", "result", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x"],
         "'result' is a folder here, not a model source (only `archtree measure` takes a "
         "result folder): give builtin:NAME"),
        (["submit", "--model", "result", "--data", "builtin:digits", "--budget", "60%"],
         "'result' is a folder here, not a model source"),
        (["prune", "--model", "net.py", "--data", "builtin:digits", "--budget", "60%",
          "--out", "x"],
         "'net.py' is a Python file, not a model source: name its module and the callable "
         "that builds the model, as in module:net:build_model, with the file's folder on "
         "PYTHONPATH (PYTHONPATH=. archtree ...)"),
    ],
)  # fmt: skip
def test_an_empty_model_or_data_or_a_local_file_as_a_source_is_refused_saying_what_to_give(
    argv, said, capsys, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "result").mkdir()
    (tmp_path / "net.py").write_text("")
    assert said in refused_usage(argv, capsys)


def test_measure_takes_a_result_folder_by_its_bare_name(tmp_path, monkeypatch):
    from archtree_cli.main import build_parser

    monkeypatch.chdir(tmp_path)
    (tmp_path / "result").mkdir()
    assert build_parser().parse_args(["measure", "--model", "result"]).model == "result"


def test_spaces_around_a_model_source_are_dropped():
    from archtree_cli.main import build_parser

    parsed = build_parser().parse_args(["measure", "--model", " builtin:vgg \n"])
    assert parsed.model == "builtin:vgg"


@pytest.mark.slow
def test_prune_says_how_far_its_long_timings_have_got_unless_quiet(tmp_path, monkeypatch, capsys):
    """Every TIMING_PROGRESS_EVERY_S (10 s) of a timing: here after every run, in this process,
    where each of the search's timings says it."""
    from argparse import Namespace

    from archtree_cli import commands

    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(commands, "TIMING_PROGRESS_EVERY_S", 0.0)
    # A narrow search: it times a child all the same, in fewer candidates.
    narrow = ["--model", "builtin:vgg", "--width", "1", "--branching", "1"]
    assert main_here(prune_args(tmp_path, *narrow)) == 0
    said = capsys.readouterr().err.splitlines()
    firsts = [line for line in said if line.startswith("  timed 1 of at least ")]
    planned = {int(line.split()[5]) for line in firsts}
    # The baseline alone (10 + 25 runs), a child with the unpruned model (2 x 35) and the
    # answer's confirmation (2 x (10 + 4 x 25)); each timing says it from its first run.
    assert planned == {35, 70, 220}, firsts
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(firsts) == report["search"]["latency_measurements"]
    options = Namespace(device="local", threads=1, batch_size=1, cache_dir=str(tmp_path))
    assert commands._oracle(options, quiet=True).on_runs is None  # prune --quiet
