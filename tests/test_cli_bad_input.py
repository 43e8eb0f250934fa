"""Every bad input the `archtree` command refuses, in one line that says what to do and
before any work: options, files, models, data and the environment."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from archtree_cli.main import debug_from_environment
from tests.cli_process import REACHABLE, archtree, one_line_error, prune_args, run_archtree


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    from search.model_source import ModelRef, build_model

    folder = tmp_path_factory.mktemp("bad")
    corrupt = folder / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file at all")
    corrupt_pt = folder / "corrupt.pt"
    corrupt_pt.write_bytes(b"garbage")
    pickled = folder / "whole_module.pt"
    torch.save(build_model(ModelRef("builtin:resnet", 10, 1)), pickled)
    odd_shape = folder / "odd.npz"

    np.savez(odd_shape, x=np.zeros((100, 3, 28, 28), dtype="float32"),
             y=np.arange(100) % 10)  # fmt: skip
    channels_last = folder / "channels_last.npz"
    np.savez(channels_last, x=np.zeros((100, 28, 28, 1), dtype="float32"),
             y=np.arange(100) % 10)  # fmt: skip
    module_dir = folder / "usercode"
    module_dir.mkdir()
    (module_dir / "script_net.py").write_text("import sys\nsys.exit(3)\n")
    (module_dir / "train_script.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        "parser.add_argument('--lr', required=True)\n"
        "parser.parse_args()\n"
    )
    (module_dir / "odd_nets.py").write_text(
        "import torch.nn as nn\n"
        "class OneAtATimeFails(nn.Sequential):\n"
        "    def forward(self, x):\n"
        "        if len(x) == 1:\n"
        "            raise ValueError('batches of one are not supported')\n"
        "        return super().forward(x)\n"
        "def single():\n"
        "    return OneAtATimeFails(nn.Flatten(), nn.Linear(64, 10))\n"
        "def linear():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
        "def double():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).double()\n"
        "class Pair(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n"
        "    def forward(self, x):\n"
        "        return self.net(x), x.sum()\n"
        "def pair():\n"
        "    return Pair()\n"
        "class Recurrent(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.gru, self.head = nn.GRU(8, 16, batch_first=True), nn.Linear(16, 10)\n"
        "    def forward(self, x):\n"
        "        return self.head(self.gru(x.reshape(len(x), 8, 8))[0][:, -1])\n"
        "def recurrent():\n"
        "    return Recurrent()\n"
    )
    (module_dir / "needs_missing.py").write_text(
        "import archtree_no_such_package\ndef build():\n    pass\n"
    )
    (module_dir / "flat_net.py").write_text(
        "import torch.nn as nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))\n"
    )
    return {"corrupt": corrupt, "corrupt_pt": corrupt_pt, "pickled": pickled,
            "odd_shape": odd_shape, "channels_last": channels_last,
            "module_dir": module_dir}  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "budget", "expected"),
    [
        (["--weights", "/nonexistent/w.safetensors"], "60%", "does not exist"),
        (["--model", "builtin:nosuchnet"], "60%", "archtree models"),
        (["--budget", "0ms"], None, "above zero"),
        # A negative budget is read, and told to be above zero.
        (["--budget=-3ms"], None, "the budget must be above zero, got '-3ms'"),
        (["--budget", "-5ms"], None, "the budget must be above zero, got '-5ms'"),
        (["--budget"], None, "expected one argument"),
        (["--width", "0"], None, "--width must be at least 1"),
        (["--strategy", "random"], None, "invalid choice"),
        (["--budget", "fast"], None, "cannot read the budget"),
        (["--budget", "0%"], None, "above zero"),
        (["--moves", "global,sideways"], None, "unknown move 'sideways'"),
        (["--moves", ","], None, "--moves needs at least one of"),
        (["--seed", "-1"], None, "--seed must be in [0, 4294967295]"),
        (["--final-epochs", "inf"], None, "--final-epochs must be a finite number"),
        (["--round-to", "1000"], None, "--round-to 1000 keeps every channel group whole"),
        (["--margin", "nan"], None, "--margin must be a finite number"),
        (["--weights", ""], None, "--weights is empty"),
        (["--out="], None, "--out is empty"),
        (["--num-classes", "200000"], None, "between 2 and 100000, not 200000"),
        (["--num-classes", "1"], None, "between 2 and 100000, not 1"),
        (["--threads", "99999"], None, "--threads must be between 1 and 1024"),
        # The service's bounds of a search, refused before any work as a typo would be.
        (["--width", "100000"], None, "--width must be at most 64, far wider than any useful"),
        (["--ft-steps", "2000000"], None, "--ft-steps must be at most 1,000,000"),
        (["--round-to", "100000"], None, "--round-to must be at most 4096"),
        (["--bn-samples", "10000000"], None, "--bn-samples must be at most 1,000,000"),
        (["--jobs", "100000"], None, "--jobs must be from 1 to 1024 (children evaluated at once)"),
        (["--train-device", "tpu"], None,
         "--train-device 'tpu' is not a training device: give auto, cpu, cuda or cuda:N"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_clear_line(tmp_path, home, extra, budget, expected):
    args = prune_args(tmp_path, *extra, budget=budget or REACHABLE)
    line = one_line_error(archtree(*args, home=home, check=False))
    assert expected.lower() in line.lower()
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_training_gpu_this_machine_lacks_is_refused_before_the_search(tmp_path, home):
    line = one_line_error(
        archtree(*prune_args(tmp_path, "--train-device", "cuda:63"), home=home, check=False)
    )
    assert line.startswith("archtree: error: --train-device cuda:63: "), line
    # A CPU build of torch, or a CUDA one that sees fewer GPUs.
    assert "install a CUDA build of torch" in line or "torch sees no such CUDA GPU" in line
    assert line.endswith("or give cpu"), line
    assert not (tmp_path / "out").exists()


def test_a_budget_asking_for_no_pruning_is_refused_in_the_lower_case_of_every_error(tmp_path, home):
    line = one_line_error(archtree(*prune_args(tmp_path, budget="150%"), home=home, check=False))
    assert line.startswith("archtree: error: a budget of 150% does not ask for any pruning")


def test_corrupt_weights(tmp_path, home, bad_files):
    for name in ("corrupt", "corrupt_pt"):
        args = prune_args(tmp_path, "--weights", str(bad_files[name]))
        line = one_line_error(archtree(*args, home=home, check=False))
        assert str(bad_files[name].name) in line


def test_pickle_is_refused_without_allow_pickle(tmp_path, home, bad_files):
    args = prune_args(tmp_path, "--weights", str(bad_files["pickled"]), "--data", "builtin:mnist")
    line = one_line_error(archtree(*args, home=home, check=False))
    assert "pickle" in line.lower() and "--allow-pickle" in line


def test_data_the_model_rejects(tmp_path, home, bad_files):
    args = prune_args(tmp_path, "--model", "module:flat_net:build", "--data", "builtin:digits")
    result = archtree(*args, home=home, check=False, extra_path=bad_files["module_dir"])
    line = one_line_error(result)
    assert "rejects inputs of shape" in line


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("module:script_net:build", "ran a script that exits (SystemExit: 3)"),
        ("module:train_script:build", "the following arguments are required: --lr"),
        ("module:odd_nets:single", "rejects a batch of one input of shape (1, 8, 8)"),
        ("module:odd_nets:double", "has torch.float64 parameters: build it in float32"),
        ("module:odd_nets:linear", "nothing in module:odd_nets:linear can be pruned"),
        ("module:odd_nets:recurrent", "by another layer); its GRU layers are not narrowed; give"),
        ("module:odd_nets:pair", "it returned a tuple: wrap it in a module whose forward"),
        (
            "module:needs_missing:build",
            "it imports 'archtree_no_such_package', which is not installed here",
        ),
    ],
)
def test_a_model_that_exits_or_fails_on_one_input_is_named(
    tmp_path, home, bad_files, source, expected
):
    args = prune_args(tmp_path, "--model", source, "--data", "builtin:digits")
    result = archtree(*args, home=home, check=False, extra_path=bad_files["module_dir"])
    assert expected in one_line_error(result)


def test_num_classes_that_a_module_model_does_not_take_is_refused(tmp_path, home, bad_files):
    args = prune_args(tmp_path, "--model", "module:odd_nets:linear", "--num-classes", "12")
    line = one_line_error(
        archtree(*args, home=home, check=False, extra_path=bad_files["module_dir"])
    )
    assert (
        "--num-classes 12 does not apply to module:odd_nets:linear, which builds its own " in line
    )
    assert "model with 10 outputs: leave --num-classes out" in line


def test_images_stored_channels_last_are_named_with_the_transpose_to_apply(
    tmp_path, home, bad_files
):
    args = prune_args(tmp_path, "--data", str(bad_files["channels_last"]))
    line = one_line_error(archtree(*args, home=home, check=False))
    assert f"the inputs of {bad_files['channels_last']} have shape (28, 28, 1)" in line
    assert "these look like images stored channels-last (28x28 with 1 channel)" in line
    assert "x.transpose(0, 3, 1, 2)" in line


def test_a_model_built_off_the_cpu_is_told_to_build_on_it():
    from search.errors import ArchtreeError
    from search.inputs import check_forward

    elsewhere = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).to("meta")
    with pytest.raises(ArchtreeError, match="has parameters on meta: build it on the CPU"):
        check_forward(elsewhere, torch.zeros(2, 1, 8, 8), "module:mine:net", "digits")


def test_a_model_of_its_own_given_channels_last_images_gets_the_same_hint():
    from search.errors import ArchtreeError
    from search.inputs import check_forward

    rgb = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    with pytest.raises(ArchtreeError) as error:
        check_forward(rgb, torch.zeros(2, 32, 32, 3), "module:mine:rgb", "images.npz")
    message = str(error.value)
    assert "rejects inputs of shape (32, 32, 3) from images.npz" in message
    assert message.endswith(
        "(32x32 with 3 channels): save x as N,C,H,W, e.g. x.transpose(0, 3, 1, 2)."
    )


class NonNegativeOnly(torch.nn.Module):
    """Runs on images of values 0..1 only, as a model that checks its inputs does."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise ValueError("pixel values must be 0..1")
        return self.layers(x)


def test_a_model_that_fails_on_the_random_inputs_it_is_timed_on_is_refused_before_timing():
    from search.errors import ArchtreeError
    from search.inputs import check_forward
    from tests.non_image_models import token_net, token_net_of_floats

    with pytest.raises(ArchtreeError) as error:
        check_forward(NonNegativeOnly(), torch.rand(2, 1, 8, 8), "module:mine:net", "digits")
    assert str(error.value) == (
        "the model module:mine:net runs on digits but fails on inputs of that shape made of "
        "random standard normal values, which latency is timed on (pixel values must be 0..1): "
        "a model must run on any values of its input shape to be timed; make its forward "
        "accept them."
    )
    tokens = torch.randint(0, 100, (2, 12)).float()
    for model, said in [
        (token_net(), "fails on tokens.npz (Expected tensor for argument #1 'indices'"),
        (token_net_of_floats(), "runs on tokens.npz but fails on inputs of that shape made"),
    ]:
        with pytest.raises(ArchtreeError) as error:
            check_forward(model.eval(), tokens, "module:mine:text", "tokens.npz")
        message = str(error.value)
        assert said in message
        assert (
            "looks its inputs up in an embedding (nn.Embedding), as token ids: save them as "
            "integers, whole numbers 0 and up" in message
        )
        assert message.endswith("it is timed on random ids its embeddings can look up.")


class TupleInTraining(torch.nn.Module):
    """Logits in eval mode; logits and auxiliary logits in training mode, as GoogLeNet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
        self.head, self.aux = torch.nn.Linear(16, 10), torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return (self.head(features), self.aux(features)) if self.training else self.head(features)


class FailsInTraining(TupleInTraining):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training, "no training here"
        return self.head(self.features(x))


@pytest.mark.parametrize(
    "model, said",
    [
        (
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1)),
            "returns one value per input. Archtree prunes classifiers",
        ),
        (
            TupleInTraining(),
            "logits in training mode; it returned a tuple: wrap it in a module whose forward",
        ),
        (FailsInTraining(), "fails in training mode (no training here), in which each"),
        (
            torch.nn.Conv2d(1, 3, 1),
            "shape (2, 3, 8, 8): Archtree prunes classifiers, and an output per pixel",
        ),
    ],
    ids=["one-output", "tuple-in-training", "fails-in-training", "per-pixel"],
)
def test_a_model_a_search_cannot_score_or_fine_tune_is_refused_and_measure_takes_it(model, said):
    from search.errors import ArchtreeError
    from search.inputs import check_forward

    samples = torch.zeros(2, 1, 8, 8)
    running = [b.clone() for b in model.buffers()]
    with pytest.raises(ArchtreeError) as error:
        check_forward(model.eval(), samples, "module:mine:net", "digits")
    assert said in str(error.value)
    assert not model.training  # checked in training mode on a copy
    assert all(torch.equal(a, b) for a, b in zip(running, model.buffers(), strict=True))
    # Timing needs no logits: `measure` takes it.
    output = check_forward(model, samples, "module:mine:net", "--input-shape", classifier=False)
    assert output.shape[0] == 2


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_search(tmp_path, home):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = prune_args(tmp_path, "--out", str(blocker / "sub"))
    result = archtree(*args, home=home, check=False)
    assert "cannot write to --out" in one_line_error(result)
    assert "depth" not in result.stderr  # refused before any search work
    assert f"{blocker} is a file, not a folder" in one_line_error(result)
    cache = prune_args(tmp_path, "--cache-dir", str(blocker))
    refused = one_line_error(archtree(*cache, home=home, check=False))
    assert f"cannot write to --cache-dir {blocker}: {blocker} is a file, not a folder" in refused
    assert not (tmp_path / "out").exists()  # the probe of a new --out folder leaves nothing


def test_an_out_folder_holding_the_input_weights_is_refused_even_with_overwrite(tmp_path, home):
    from search.model_source import ModelRef, build_model, save_weights

    folder = tmp_path / "mine"
    weights = folder / "model.safetensors"
    save_weights(build_model(ModelRef("builtin:resnet", 10, 1)), weights)
    before = weights.read_bytes()
    args = prune_args(tmp_path, "--weights", str(weights), "--out", str(folder))
    for extra in ([], ["--overwrite"]):
        line = one_line_error(archtree(*args, *extra, home=home, check=False))
        assert f"--out {folder} would replace the --weights file" in line
        assert "(the result's model.safetensors): choose another --out" in line
    assert weights.read_bytes() == before
    assert sorted(path.name for path in folder.iterdir()) == ["model.safetensors"]


def test_a_model_with_weights_that_are_not_finite_is_not_saved(tmp_path):

    from search.arch_spec import spec_of
    from search.artifacts import save_artifacts
    from search.errors import ArchtreeError
    from search.model_source import ModelRef, build_model

    model = build_model(ModelRef("builtin:vgg", 10, 1))
    spec = spec_of(model, ModelRef("builtin:vgg", 10, 1), (1, 1, 8, 8))
    save_artifacts(tmp_path / "fine", spec, model, {})
    assert (tmp_path / "fine" / "model.safetensors").exists()
    model.features[0][1].running_var[3] = float("inf")  # as overflowing batch-norm statistics
    with pytest.raises(ArchtreeError, match=r"features\.0\.1\.running_var holds NaN or infinite"):
        save_artifacts(tmp_path / "broken", spec, model, {})
    assert not (tmp_path / "broken").exists()


def _vgg_result_parts(seed: int):
    from search.arch_spec import spec_of
    from search.model_source import ModelRef, build_model

    torch.manual_seed(seed)
    ref = ModelRef("builtin:vgg", 10, 1)
    model = build_model(ref)
    return spec_of(model, ref, (1, 8, 8)), model


def _loaded_after_editing_its_arch_json(tmp_path, edit) -> tuple[Path, Path, str]:
    """A VGG result whose arch.json `edit` changed: its folder, its arch.json, and the message
    of the ArchtreeError load_pruned raises on it."""
    from search.artifacts import load_pruned, save_artifacts
    from search.errors import ArchtreeError

    spec, model = _vgg_result_parts(seed=0)
    folder = save_artifacts(tmp_path / "result", spec, model, {})
    arch = folder / "arch.json"
    arch.write_text(json.dumps(edit(json.loads(arch.read_text()))))
    with pytest.raises(ArchtreeError) as error:
        load_pruned(folder)
    return folder, arch, str(error.value)


def test_a_result_that_cannot_be_written_whole_leaves_the_earlier_one_as_it_was(tmp_path):
    """A full disk while the result is saved: the folder keeps the result it held, with no
    file of the new one and no leftovers."""
    from search.artifacts import ARTIFACT_NAMES, load_pruned, save_artifacts
    from search.errors import ArchtreeError
    from tests.file_limits import files_written_up_to

    folder = tmp_path / "out"
    save_artifacts(folder, *_vgg_result_parts(seed=0), {"run": 1})
    before = {name: (folder / name).read_bytes() for name in ARTIFACT_NAMES}
    size = len(before["model.safetensors"])

    with files_written_up_to(size // 2), pytest.raises(ArchtreeError) as failed:
        save_artifacts(folder, *_vgg_result_parts(seed=1), {"run": 2})

    assert str(failed.value).startswith(f"cannot write the result into {folder} (")
    assert str(failed.value).endswith(
        "nothing there was changed; free some space, or give another --out, and run again"
    )
    assert sorted(path.name for path in folder.iterdir()) == sorted(ARTIFACT_NAMES)
    assert {name: (folder / name).read_bytes() for name in ARTIFACT_NAMES} == before
    load_pruned(folder)  # the earlier result, whole
    save_artifacts(folder, *_vgg_result_parts(seed=1), {"run": 2})  # room again: replaced
    assert (folder / "report.json").read_text() == '{\n  "run": 2\n}'


def test_a_result_that_cannot_be_saved_says_its_search_is_kept(tmp_path, monkeypatch):
    """The saved search outlives a failed save (a full disk), and a run once there is room
    goes on from it: the error says so, where it said only to run again."""
    import search.artifacts
    from archtree_cli.commands import prune
    from latency.local_oracle import LocalOracle
    from search.arch_spec import build_from_spec
    from search.checkpoint import SearchCheckpoint
    from search.errors import ArchtreeError
    from search.settings import SearchSettings
    from tests.conftest import fast_timing

    def disk_full(out, *_args) -> None:
        raise ArchtreeError(
            f"cannot write the result into {out} (File too large): nothing there was changed; "
            "free some space, or give another --out, and run again"
        )

    monkeypatch.setattr(search.artifacts, "save_artifacts", disk_full)
    checkpoint = SearchCheckpoint(tmp_path / "searches", {"model": "builtin:vgg"})
    assert checkpoint.acquire()
    settings = SearchSettings(width=1, branching=2, ft_steps=2, select_steps=2, fill_probes=0)
    with pytest.raises(ArchtreeError) as failed:
        prune(
            model="builtin:vgg", data="builtin:digits", budget=REACHABLE,
            out=str(tmp_path / "out"), settings=settings.effective(),
            oracle=LocalOracle(build_from_spec, settings=fast_timing()), quiet=True,
            checkpoint=checkpoint,
        )  # fmt: skip
    assert str(failed.value).endswith(
        "free some space, or give another --out, and run again; the search is saved with its "
        "tree search finished, and the same command goes on from there (--restart starts it "
        "afresh)"
    )
    state, _ = checkpoint.saved()
    assert state.done


def test_a_run_refused_for_its_inputs_leaves_no_saved_search(tmp_path):
    home = tmp_path / "home"
    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    x[5, 0, 3, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(300) % 10)

    result = archtree(
        *prune_args(tmp_path, "--data", str(tmp_path / "nan.npz")), home=home, check=False
    )

    assert "NaN" in one_line_error(result)
    assert list((home / "searches").iterdir()) == []


def test_a_folder_in_the_place_of_a_result_file_is_refused_before_the_search(tmp_path, home):
    folder = tmp_path / "out"
    (folder / "model.safetensors").mkdir(parents=True)

    for extra in ([], ["--overwrite"]):
        result = archtree(*prune_args(tmp_path, *extra), home=home, check=False)
        line = one_line_error(result)
        assert line == (
            f"archtree: error: {folder / 'model.safetensors'} is a folder where the result's "
            "model.safetensors goes: move it away, or choose another --out."
        )
        assert "baseline" not in result.stderr  # refused before the unpruned model is timed
    assert [path.name for path in folder.iterdir()] == ["model.safetensors"]


def test_load_pruned_of_a_path_that_is_no_folder_says_so(tmp_path):
    from search.artifacts import load_pruned
    from search.errors import ArchtreeError

    with pytest.raises(ArchtreeError) as missing:
        load_pruned(tmp_path / "nowhere")
    assert str(missing.value) == (
        f"{tmp_path / 'nowhere'} is not there: point to the folder archtree prune (or fetch) wrote."
    )
    (tmp_path / "arch.json").write_text("{}")
    with pytest.raises(ArchtreeError) as file:
        load_pruned(tmp_path / "arch.json")
    assert str(file.value).startswith(f"{tmp_path / 'arch.json'} is a file, not a folder: ")
    (tmp_path / "model.safetensors").mkdir()  # a folder where the weights go
    with pytest.raises(ArchtreeError) as folder:
        load_pruned(tmp_path)
    assert str(folder.value) == (
        f"{tmp_path / 'model.safetensors'} is not a file: point to a folder written by archtree "
        "prune."
    )


def test_a_result_whose_weights_do_not_fit_or_are_cut_short_is_one_line(tmp_path, home):
    from search.artifacts import load_pruned, save_artifacts
    from search.errors import ArchtreeError

    spec, model = _vgg_result_parts(seed=0)
    folder = save_artifacts(tmp_path / "result", spec, model, {})
    other = save_artifacts(tmp_path / "other", spec, model.features[:1], {})  # other weights
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()

    weights.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ArchtreeError) as mismatched:
        load_pruned(folder)
    message = str(mismatched.value)
    assert message.startswith(
        f"{weights} does not fit the architecture in {folder / 'arch.json'} (Error(s) in "
        "loading state_dict for VGG: Missing key(s)"
    )
    assert "\n" not in message and message.endswith("run archtree prune (or fetch) again")
    measured = archtree("measure", "--model", str(folder), home=home, check=False)
    assert one_line_error(measured).startswith(f"archtree: error: {weights} does not fit")

    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchtreeError) as cut:
        load_pruned(folder)
    assert str(cut.value).startswith(f"{weights} cannot be read (")
    assert "damaged or was cut short" in str(cut.value)


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda arch: [], "it holds a JSON list, not an object"),
        (lambda arch: arch | {"layers": [1, 2]}, "its `layers` is a JSON list, not an object"),
        (lambda arch: arch | {"model": "vgg"}, "its `model` is not an object of source"),
        (
            lambda arch: arch | {"layers": arch["layers"] | {"features.0.0": [1, 0, 1]}},
            "the shape of layer 'features.0.0' is [1, 0, 1], not a list of sizes of 1 or more",
        ),
        (lambda arch: arch | {"input_shape": None}, "its `input_shape` is null, not a list"),
        (
            lambda arch: arch | {"model": arch["model"] | {"num_classes": float("inf")}},
            "invalid model reference",
        ),
        (lambda arch: arch | {"token_range": float("inf")}, "cannot convert float infinity"),
    ],
)
def test_an_arch_json_of_the_wrong_structure_is_one_line_naming_it(tmp_path, home, edit, said):
    folder, arch, message = _loaded_after_editing_its_arch_json(tmp_path, edit)
    assert message.startswith(f"{arch} is not a valid architecture spec ({said}")
    assert message.endswith("or `archtree fetch` for a service job.")
    measured = archtree("measure", "--model", str(folder), home=home, check=False)
    assert one_line_error(measured).startswith(f"archtree: error: {arch} is not a valid")


@pytest.mark.parametrize(
    "edit",
    [
        lambda arch: arch | {"model": arch["model"] | {"in_channels": 3}},  # not its weights'
        lambda arch: arch | {"input_shape": [1, 1, 1]},  # too small for its pooling
        lambda arch: arch | {"token_range": 5},  # token ids, for a model of images
    ],
)
def test_an_arch_json_whose_model_cannot_be_built_and_run_is_one_line_naming_it(
    tmp_path, home, edit
):
    _, arch, message = _loaded_after_editing_its_arch_json(tmp_path, edit)
    assert message.startswith(f"the model {arch} describes cannot be built and run (")
    assert "\n" not in message and message.endswith("run archtree prune (or fetch) again")


def test_a_result_whose_weights_hold_nan_is_refused_on_loading(tmp_path):
    from safetensors.torch import load_file, save_file

    from search.artifacts import load_pruned, save_artifacts
    from search.errors import ArchtreeError

    spec, model = _vgg_result_parts(seed=0)
    folder = save_artifacts(tmp_path / "result", spec, model, {})
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[-1]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(weights))

    with pytest.raises(ArchtreeError) as error:
        load_pruned(folder)
    assert str(error.value) == (
        f"{weights} holds NaN or infinite values in {name}: the file is damaged or was edited; "
        "run archtree prune (or fetch) again"
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--input-shape", "1,1,1"], "rejects inputs of shape (1, 1, 1)"),
        (["--num-classes", "100000000"], "--num-classes must be between 1 and 100000"),
        (["--input-shape", "1,100000,100000"], "GiB: give a smaller shape or batch size"),
        (["--input-shape", "1,2,3,4,5"], "is not one sample's shape, 1 to 4 positive numbers"),
        (["--input-shape", "1,0,8"], "is not one sample's shape"),
        (["--input-shape", "12"], "builtin:vgg takes images: give --input-shape as C,H,W"),
        (["--model", "pruned/"], "no folder 'pruned/': --model takes a folder `archtree prune`"),
    ],
)
def test_measure_bad_input_gives_one_clear_line(home, extra, expected):
    result = archtree("measure", "--model", "builtin:vgg", *extra, home=home, check=False)
    assert expected in one_line_error(result)


def _free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["up", "--port", "99999"], {}, "--port: must be a number from 1 to 65535, got '99999'"),
        (["up", "--host", "10.255.255.1", "--port", _free_port()], {},
         "--host 10.255.255.1 is not an address of this machine"),
        (["up", "--host", "nosuch.invalid"], {},
         "): give one of its own, 127.0.0.1 for this machine only, or 0.0.0.0 for all"),
        (["up"], {"ARCHTREE_HOME": "/dev/null/home"},
         "set ARCHTREE_HOME to a folder you can write to"),
        (["measure", "--model", "builtin:vgg"], {"ARCHTREE_HOME": "/dev/null/home"},
         "set ARCHTREE_HOME to a folder you can write to, or give --cache-dir"),
        (["measure", "--model", "builtin:vgg", "--batch-size", "0"], {},
         "--batch-size must be between 1 and 65536, got 0"),
        (["agent", "--redis-url", "http://x", "--device-class", "x"], {},
         "cannot use 'http://x' as the Redis URL"),
        (["agent", "--device-class", "x", "--threads", "5000"], {},
         "--threads must be between 1 and 1024, got 5000"),
        (["agent", "--device-class", "x", "--allow-module", "os;rm"], {},
         "--allow-module 'os;rm' is not a Python package name"),
        (["agent", "--device-class", "x", "--allow-module", ""], {},
         "--allow-module '' is not a Python package name"),
        (["jobs", "--limit", "0"], {}, "--limit must be from 1 to 200"),
        (["worker", "--train-device", "gpu"], {},
         "--train-device 'gpu' is not a training device: give auto, cpu, cuda or cuda:N"),
        (["worker"], {"ARCHTREE_TRAIN_DEVICE": "gpu0"},
         "ARCHTREE_TRAIN_DEVICE 'gpu0' is not a training device: give auto, cpu, cuda or cuda:N"),
        pytest.param(["worker"], {"ARCHTREE_TRAIN_DEVICE": "cuda:1"},
                     "ARCHTREE_TRAIN_DEVICE cuda:1: this torch is a CPU-only build",
                     marks=pytest.mark.skipif(torch.backends.cuda.is_built(),
                                              reason="a CUDA build of torch")),
        (["jobs", "--offset", "-1"], {}, "--offset must be from 0 to 1000000000, got -1"),
        (["models"], {"ARCHTREE_DEBUG": "maybe"}, "ARCHTREE_DEBUG='maybe' is not a switch"),
    ],
)  # fmt: skip
def test_bad_service_and_environment_input_gives_one_clear_line(home, args, env, expected):
    result = run_archtree(*args, home=home, env=env)
    assert expected in one_line_error(result)
    # Refused before anything else is said (a warning about the value refused, say).
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    ("value", "on"), [("", False), ("0", False), ("off", False), ("1", True), ("True", True)]
)
def test_archtree_debug_is_a_switch(monkeypatch, value, on):
    monkeypatch.setenv("ARCHTREE_DEBUG", value)
    assert debug_from_environment() is on


def test_a_misspelled_variable_is_warned_about_and_the_command_runs(home):
    result = run_archtree(
        "models", home=home, env={"ARCHTREE_REDIS_ULR": "redis://x", "ARCHTREE_COLOUR": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert "builtin:resnet" in result.stdout  # the command itself ran
    warnings = result.stderr.splitlines()
    assert warnings == [
        "archtree: warning: ARCHTREE_COLOUR is not a setting of Archtree and is ignored: the "
        "variables it reads are in README.md, Settings (environment)",
        "archtree: warning: ARCHTREE_REDIS_ULR is not a setting of Archtree and is ignored: "
        "did you mean ARCHTREE_REDIS_URL?",
    ]


def test_every_variable_archtree_reads_is_known_and_none_is_warned_about(home):
    """The known names are the service settings' fields and the command line's own, and the
    README's table of settings lists exactly those."""
    from archtree_cli.environment import COMMAND_VARIABLES, SERVICE_VARIABLES
    from archtree_cli.settings import ServiceSettings

    fields = {f"ARCHTREE_{name.upper()}" for name in ServiceSettings.model_fields}
    assert set(SERVICE_VARIABLES) == fields
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("## Settings (environment)")[1].split("\n## ")[0]
    documented = set(re.findall(r"`(ARCHTREE_[A-Z0-9_]+)`", table))
    assert documented == set(SERVICE_VARIABLES + COMMAND_VARIABLES)
    everything = {name: "1" for name in SERVICE_VARIABLES + COMMAND_VARIABLES}
    from archtree_cli.environment import unknown_variable_warnings

    assert unknown_variable_warnings(everything) == []
    assert unknown_variable_warnings({"ARCHTREE_HOMR": "x", "PATH": "x"}) == [
        "ARCHTREE_HOMR is not a setting of Archtree and is ignored: did you mean ARCHTREE_HOME?"
    ]


def test_more_threads_than_cores_are_warned_about(home):
    threads = len(os.sched_getaffinity(0)) + 1
    result = archtree(
        "measure", "--model", "builtin:vgg", "--input-shape", "1,8,8", "--threads",
        str(threads), home=home,
    )  # fmt: skip
    assert f"--threads {threads} is more than the" in result.stderr


def test_a_workers_train_device_reaches_the_settings_its_tasks_read(monkeypatch):
    """--train-device was set after the worker's settings had been read and cached, and its
    tasks trained where ARCHTREE_TRAIN_DEVICE (or auto) said."""
    from argparse import Namespace

    import workers.celery_app
    from archtree_cli.service_commands import run_worker
    from archtree_cli.settings import service_settings

    monkeypatch.setenv("ARCHTREE_TRAIN_DEVICE", "auto")
    service_settings.cache_clear()
    assert service_settings().train_device == "auto"  # read before, as an import does
    seen: dict[str, str] = {}

    def worker_main(*_args, **_kwargs) -> None:
        seen["train_device"] = service_settings().train_device

    monkeypatch.setattr(workers.celery_app, "worker_main", worker_main)
    try:
        run_worker(Namespace(train_device=" CPU ", queues=None, concurrency=1, name=None))
    finally:
        service_settings.cache_clear()
    assert seen == {"train_device": "cpu"}


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("ARCHTREE_TRAIN_DEVICE", "gpu0", "give auto, cpu, cuda or cuda:N"),
        # Agents beat every 3 s: a shorter TTL shows live agents offline between beats.
        (
            "ARCHTREE_HEARTBEAT_TTL_S",
            "5",
            "agents beat every 3 s, so a TTL under 6 s shows live agents offline between "
            "beats: give at least that (default 15 s)",
        ),
    ],
)
def test_a_settings_validators_message_is_said_without_pydantics_prefix(
    variable, value, said, monkeypatch
):
    from archtree_cli.settings import load_service_settings
    from search.errors import ArchtreeError

    monkeypatch.setenv(variable, value)
    with pytest.raises(ArchtreeError) as refused:
        load_service_settings()
    assert str(refused.value) == f"bad setting in the environment: {variable}={value!r}: {said}"


def test_a_heartbeat_ttl_of_two_beats_is_taken(monkeypatch):
    from archtree_cli.settings import load_service_settings

    monkeypatch.setenv("ARCHTREE_HEARTBEAT_TTL_S", "6")
    assert load_service_settings().heartbeat_ttl_s == 6.0
