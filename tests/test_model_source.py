"""Model sources and weight files: every user mistake gives a one-line ArchtreeError."""

from __future__ import annotations

import os
import pickle
import stat
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search.errors import ArchtreeError
from search.inputs import load_inputs
from search.model_source import (
    ModelRef,
    build_model,
    describe_builtin_models,
    load_weights,
    save_weights,
)
from search.zoo import builtin_names

REF = ModelRef("builtin:vgg", num_classes=10, in_channels=1)


def _error(excinfo: pytest.ExceptionInfo[ArchtreeError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _built(ref: ModelRef = REF, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(ref)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# Building models


def test_model_ref_round_trips_through_a_dict() -> None:
    assert ModelRef.from_dict(REF.to_dict()) == REF
    with pytest.raises(ArchtreeError) as excinfo:
        ModelRef.from_dict({"source": "builtin:vgg"})
    assert "num_classes" in _error(excinfo)


@pytest.mark.parametrize("name", builtin_names())
def test_builtin_builds_in_eval_mode_and_deterministically(name: str) -> None:
    ref = ModelRef(f"builtin:{name}", num_classes=5, in_channels=3)
    model = _built(ref)
    assert not model.training
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    assert _same_weights(model, _built(ref))
    assert not _same_weights(model, _built(ref, seed=1))


def test_unknown_builtin_lists_the_known_names() -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        build_model(ModelRef("builtin:alexnet", 10, 1))
    message = _error(excinfo)
    assert "alexnet" in message and "archtree models" in message
    assert all(name in message for name in builtin_names())


@pytest.mark.parametrize("source", ["keras:resnet", "resnet18", "builtin:", ""])
def test_unknown_prefix_lists_the_accepted_forms(source: str) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        build_model(ModelRef(source, 10, 1))
    message = _error(excinfo)
    assert "builtin:NAME" in message and "module:package.module:callable" in message


@pytest.mark.parametrize(
    ("source", "meant"),
    [
        ("torchvison:resnet18", "did you mean 'torchvision:resnet18'?"),
        ("Timm:vit_tiny", "did you mean 'timm:vit_tiny'?"),
        ("VGG", "did you mean 'builtin:vgg'?"),
        ("Builtin:VGG", "did you mean 'builtin:vgg'?"),
        ("builtin:ResNet", "unknown builtin model 'ResNet'; did you mean 'builtin:resnet'?"),
        ("builtin:mobilenet_v2", "did you mean 'builtin:mobilenetv2'?"),
        ("builtin:transformer", "unknown builtin model 'transformer'; known: vgg, resnet"),
        ("resnet18", "as in 'torchvision:resnet18' or 'timm:resnet18'"),
        ("builtin:", "names no model after 'builtin:'"),
        ("resnet.pt", "'resnet.pt' names a weights file, not a model source"),
        ("runs/best.ckpt", "and the weights file as --weights"),
        ("pruned/", "'pruned/' is a path, not a model source"),
        ("~/models/net", "'~/models/net' is a path, not a model source"),
        ("keras:resnet", "unknown model source 'keras:resnet'; accepted forms"),
    ],
)
def test_a_source_naming_no_model_is_told_what_was_likely_meant(source: str, meant: str) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        build_model(ModelRef(source, 10, 1))
    assert meant in _error(excinfo)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        build_model(ModelRef("builtin:vgg", 0, 1))
    assert "num_classes" in _error(excinfo)


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny importable package of user model code under tmp_path."""
    package = tmp_path / "usernets"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def tiny():
                return nn.Sequential(
                    nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(4, 10),
                ).train()

            def not_a_model():
                return 42

            def scripted():
                return torch.jit.script(tiny())

            def traced():
                return torch.jit.trace(tiny().eval(), torch.zeros(1, 1, 8, 8))

            def compiled():
                return torch.compile(tiny(), backend="eager")  # as refused, and quick to run

            def broken():
                raise ValueError("needs a config")

            def configured(width, depth=2):
                return tiny()

            NOT_CALLABLE = 3
            """
        )
    )
    (package / "crashes.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "usernets"
    for name in [m for m in sys.modules if m.startswith("usernets")]:
        del sys.modules[name]


def test_module_source_builds_the_user_model(user_package: str) -> None:
    model = build_model(ModelRef(f"module:{user_package}.models:tiny", 10, 1))
    assert not model.training
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("module:usernets.models", ["expected", "module:package.module:callable"]),
        ("module::tiny", ["expected", "module:package.module:callable"]),
        ("module:a:b:c", ["expected", "module:package.module:callable"]),
        ("module:nowhere_pkg_xyz.models:tiny", ["nowhere_pkg_xyz", "PYTHONPATH"]),
        ("module:usernets.crashes:tiny", ["usernets.crashes", "boom at import"]),
        ("module:usernets.models:missing", ["no attribute", "missing"]),
        ("module:usernets.models:NOT_CALLABLE", ["not callable"]),
        ("module:usernets.models:not_a_model", ["returned an int, not", "nn.Module"]),
        # A file's path where its module's dotted name goes: the module and the folder to put
        # on PYTHONPATH are named.
        (
            "module:usernets/models.py:tiny",
            ["names a file", "module:models:tiny", "PYTHONPATH=usernets archtree"],
        ),
        ("module:models.py:tiny", ["module:models:tiny", "PYTHONPATH=. archtree"]),
        # A factory that fails is told to be fixed; one that takes arguments, to be wrapped.
        ("module:usernets.models:broken", ["needs a config", "; fix it there (it is called"]),
        (
            "module:usernets.models:configured",
            [
                "configured() from 'usernets.models' cannot be called with no arguments (missing "
                "a required argument: 'width')",
                "calls it with yours",
            ],
        ),
    ],
)
def test_module_source_errors(user_package: str, source: str, words: list[str]) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        build_model(ModelRef(source, 10, 1))
    message = _error(excinfo)
    assert all(word in message for word in words), message


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("scripted", ["TorchScript", "before torch.jit.script"]),
        ("traced", ["TorchScript", "or trace"]),
        ("compiled", ["torch.compile'd", "before torch.compile"]),
    ],
)
def test_a_compiled_or_scripted_model_is_timed_as_it_is_but_not_pruned(
    user_package: str, name: str, words: list[str]
) -> None:
    source = f"module:{user_package}.models:{name}"
    model = build_model(ModelRef(source, 10, 1))  # what `measure` times
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    with pytest.raises(ArchtreeError) as excinfo:
        load_inputs(source, "builtin:digits")
    message = _error(excinfo)
    assert all(word in message for word in words), message


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_optional_libraries_work_or_say_they_are_not_usable(library: str) -> None:
    ref = ModelRef(f"{library}:resnet18", num_classes=10, in_channels=3)
    try:
        __import__(library)
    except Exception as error:
        with pytest.raises(ArchtreeError) as excinfo:
            build_model(ref)
        message = _error(excinfo)
        assert library in message and "not usable" in message
        assert "builtin:" in message and "module:" in message
        if isinstance(error, ModuleNotFoundError) and error.name == library:
            made_for = f"install {library} into this environment (a release made for torch "
            assert f"{made_for}{torch.__version__.split('+')[0]})" in message, message
    else:
        assert isinstance(build_model(ref), nn.Module)


def test_describe_builtin_models() -> None:
    rows = describe_builtin_models()
    assert [row["name"] for row in rows] == builtin_names()
    for row in rows:
        assert row["family"] and row["description"]
        assert row["params"] > 1000


# Weights


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = _built(seed=1)
    path = tmp_path / "sub" / "weights.safetensors"
    save_weights(model, path)
    fresh = _built(seed=2)
    load_weights(fresh, path)
    assert _same_weights(model, fresh)


def test_save_weights_handles_tied_and_non_contiguous_tensors(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight
            self.register_buffer("t", torch.randn(4, 3).t())

    model = Tied()
    save_weights(model, tmp_path / "tied.safetensors")
    fresh = Tied()
    load_weights(fresh, tmp_path / "tied.safetensors")
    assert torch.equal(fresh.a.weight, model.a.weight)
    assert torch.equal(fresh.t, model.t)


def test_saved_weights_get_the_permissions_of_any_new_file(tmp_path: Path) -> None:
    save_weights(_built(seed=1), tmp_path / "model.safetensors")
    (tmp_path / "report.json").write_text("{}")
    mode = stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "report.json").stat().st_mode)


def test_weights_are_read_by_their_content_whatever_their_extension(tmp_path: Path) -> None:
    model = _built(seed=1)
    torch.save(model.state_dict(), tmp_path / "torch_saved.safetensors")
    save_weights(model, tmp_path / "safetensors.pt")
    for name in ("torch_saved.safetensors", "safetensors.pt"):
        fresh = _built(seed=2)
        load_weights(fresh, tmp_path / name)
        assert _same_weights(model, fresh), name


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "model_state_dict"])
def test_state_dict_round_trip(tmp_path: Path, wrap: str | None) -> None:
    model = _built(seed=1)
    state = model.state_dict()
    # As PyTorch's tutorials save a checkpoint: the optimizer's state beside the model's.
    checkpoint = {wrap: state, "epoch": 3, "optimizer_state_dict": {"state": {}}}
    torch.save(state if wrap is None else checkpoint, tmp_path / "w.pt")
    fresh = _built(seed=2)
    load_weights(fresh, tmp_path / "w.pt")
    assert _same_weights(model, fresh)


def test_pickled_module_is_refused_without_allow_pickle(tmp_path: Path) -> None:
    model = _built(seed=1)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "whole.pt")
    message = _error(excinfo)
    assert "pickled" in message and "arbitrary code" in message
    assert "state_dict()" in message and "--allow-pickle" in message
    fresh = _built(seed=2)
    load_weights(fresh, tmp_path / "whole.pt", allow_pickle=True)
    assert _same_weights(model, fresh)


def test_pickle_with_other_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"x": np.zeros(3)}, tmp_path / "numpy.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "numpy.pt")
    message = _error(excinfo)
    assert "numpy" in message and "arbitrary code" in message and "--allow-pickle" in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "absent.pt")
    assert "does not exist" in _error(excinfo)


@pytest.mark.parametrize(
    ("name", "content"),
    [("garbage.pt", b"\x93not a pickle at all" * 20), ("empty.pt", b""), ("text.pt", b"hello")],
)
def test_garbage_file_is_called_corrupt(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / name)
    message = _error(excinfo)
    assert "corrupt" in message and "pickled" not in message


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_called_corrupt(tmp_path: Path, suffix: str) -> None:
    model = _built()
    full = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), full)
    else:
        save_weights(model, full)
    data = full.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(model, cut)
    assert "corrupt" in _error(excinfo)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (torch.zeros(3), ["Tensor", "not a state dict"]),
        ({"features.0.0.weight": torch.zeros(1), "note": "hello"}, ["note", "not tensors"]),
    ],
)
def test_non_tensor_content(tmp_path: Path, content: object, words: list[str]) -> None:
    torch.save(content, tmp_path / "odd.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "odd.pt")
    message = _error(excinfo)
    assert all(word in message for word in words), message


def test_mismatched_keys_and_shapes_are_named(tmp_path: Path) -> None:
    resnet = build_model(ModelRef("builtin:resnet", 10, 1))
    save_weights(resnet, tmp_path / "resnet.safetensors")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "resnet.safetensors", source="builtin:vgg")
    message = _error(excinfo)
    assert "builtin:vgg" in message and "missing" in message and "unexpected" in message
    assert "more" in message

    twelve = build_model(ModelRef("builtin:vgg", 12, 1))
    save_weights(twelve, tmp_path / "vgg12.safetensors")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "vgg12.safetensors")
    message = _error(excinfo)
    assert "shape mismatch" in message and "classifier.weight" in message and "VGG" in message


def test_weights_with_nan_are_refused_and_named(tmp_path: Path) -> None:
    model = _built()
    state = model.state_dict()
    state["classifier.weight"] = torch.full_like(state["classifier.weight"], float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "diverged.pt")
    message = _error(excinfo)
    assert "NaN or infinite" in message and "classifier.weight" in message
    assert "more" not in message


def test_finite_weights_whose_outputs_overflow_are_refused(tmp_path: Path) -> None:
    from search.inputs import load_inputs

    model = build_model(ModelRef("builtin:vgg", 10, 1))
    huge = {k: v * 1e30 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(huge, tmp_path / "huge.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_inputs("builtin:vgg", "builtin:digits", weights=str(tmp_path / "huge.pt"))
    assert "outputs NaN or infinite values on builtin:digits" in _error(excinfo)
    assert "its weights are finite, so its forward makes them on some inputs" in _error(excinfo)


def test_a_forward_that_makes_nan_of_finite_weights_is_not_said_to_have_broken_ones():
    from search.inputs import load_inputs

    with pytest.raises(ArchtreeError) as excinfo:
        load_inputs("module:tests.odd_models:nan_for_bright_pixels", "builtin:digits")
    message = _error(excinfo)
    assert "outputs NaN or infinite values on builtin:digits" in message
    assert "its weights are finite" in message and "diverged" not in message


def test_a_checkpoint_with_its_tensors_under_another_key_names_it(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "weights_ema": _built().state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path / "ckpt.pt")
    message = _error(excinfo)
    assert "checkpoint with its tensors under weights_ema" in message
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(), tmp_path)
    assert "is a folder or a device, not a file" in _error(excinfo)


@pytest.mark.parametrize(
    "prefix",
    [
        "module.",  # DataParallel
        "_orig_mod.",  # torch.compile
        "model.",  # a training module holding the model (Lightning's checkpoints)
        "module._orig_mod.",  # both wrappers
    ],
)
def test_weights_saved_from_a_wrapper_around_the_model_are_accepted(
    tmp_path: Path, prefix: str
) -> None:
    model = _built(seed=1)
    state = {f"{prefix}{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    fresh = _built(seed=2)
    load_weights(fresh, tmp_path / "wrapped.pt")
    assert _same_weights(model, fresh)


def test_weights_under_a_wrapper_that_miss_a_tensor_are_refused_naming_it(
    tmp_path: Path,
) -> None:
    model = _built(seed=1)
    # With the wrapper's name removed one tensor is still missing: that one is named.
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    dropped = next(iter(model.state_dict()))
    del state[f"model.{dropped}"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(_built(seed=2), tmp_path / "partial.pt")
    message = _error(excinfo)
    assert f"do not fit model VGG: missing {dropped}; use the model" in message, message


class _RunsCommand:
    def __reduce__(self):
        return os.system, ("true",)


def pickle_naming_its_call_on_the_stack() -> bytes:
    """A pickle that calls os.system when loaded, naming it on its stack (STACK_GLOBAL), as
    pickles of protocol 4 and above do."""
    return pickle.dumps(_RunsCommand(), protocol=4)


def test_a_pickle_naming_its_call_on_its_stack_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "legacy.pt").write_bytes(pickle_naming_its_call_on_the_stack())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the protocol is not passed on
        with pytest.raises(ArchtreeError) as excinfo:
            load_weights(_built(), tmp_path / "legacy.pt")
    message = _error(excinfo)
    assert "holds Python objects besides tensors (posix.system)" in message
    assert "loading them runs arbitrary code" in message


@pytest.mark.parametrize(
    ("saved", "said"),
    [
        (
            ModelRef("builtin:vgg", 100, 1),
            "the weights classify 100 classes and the model 10 (the data's labels, or "
            "--num-classes): give --num-classes 100",
        ),
        (
            ModelRef("builtin:vgg", 10, 3),
            "the weights take 3 input channels and the model 1 (the data's): give inputs of 3 "
            "channels",
        ),
        (ModelRef("builtin:resnet", 10, 1), "use the model the weights were saved from"),
    ],
)
def test_weights_of_other_classes_or_channels_say_which(
    tmp_path: Path, saved: ModelRef, said: str
) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model(saved).state_dict(), path)
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(build_model(ModelRef("builtin:vgg", 10, 1)), str(path))
    assert said in _error(excinfo)


def test_weights_of_other_classes_for_a_module_model_do_not_advise_num_classes(tmp_path: Path):
    """A `module:` factory builds its own classifier, whatever --num-classes says: the
    advice is to build it with the weights' classes."""
    path = tmp_path / "weights.pt"
    torch.save(build_model(ModelRef("builtin:vgg", 5, 1)).state_dict(), path)
    with pytest.raises(ArchtreeError) as excinfo:
        load_weights(
            build_model(ModelRef("builtin:vgg", 10, 1)), str(path), source="module:mynets:vgg"
        )
    message = _error(excinfo)
    assert message.endswith(
        "the weights classify 5 classes and the model module:mynets:vgg builds 10: have its "
        "factory build a model of 5 outputs, or give the weights of the model it builds"
    )
    assert "--num-classes" not in message


def test_a_model_of_sequences_is_recorded_with_the_channels_its_inputs_have(tmp_path: Path):
    from tests.test_cli import sequences_file

    data = sequences_file(tmp_path / "sequences.pt")  # N,C,L: 4 channels, not one image's
    inputs = load_inputs("module:tests.non_image_models:sequence_net", str(data))
    assert inputs.data.input_shape == (4, 48)
    assert inputs.model_ref.in_channels == 4
    # Images keep theirs.
    assert load_inputs("builtin:vgg", "builtin:digits").model_ref.in_channels == 1


def test_a_forward_pass_that_runs_out_of_memory_is_said_to_need_a_smaller_batch():
    from search.inputs import check_forward

    class Hungry(nn.Module):
        """Allocates far more than any machine has, as a batch too large for it would."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # More than any address space holds: it fails whatever the machine allows.
            return x.flatten(1) + torch.empty(1 << 60, dtype=torch.uint8)[0]

    with pytest.raises(ArchtreeError) as refused:
        check_forward(
            Hungry(),
            torch.zeros(8, 1, 4, 4),
            "module:m:hungry",
            "--input-shape 1,4,4",
            batch_option="--batch-size",
        )
    said = str(refused.value)
    assert said.startswith(
        "the model module:m:hungry ran out of memory on a batch of 8 inputs of shape (1, 4, 4) "
        "from --input-shape 1,4,4 ("
    ), said
    assert said.endswith("): give a smaller --batch-size or input shape.")
    # Where no option sets the batch (two samples of the data, checked as they load).
    with pytest.raises(ArchtreeError) as refused:
        check_forward(Hungry(), torch.zeros(2, 1, 4, 4), "module:m:hungry", "data.npz")
    assert str(refused.value).endswith("): free memory, or give a smaller model or input shape.")
