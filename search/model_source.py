"""Model sources: build a model from a reference string, load and save its weights.

A source is one of `builtin:NAME` (our zoo), `module:package.module:callable` (user code that
returns an `nn.Module`), `torchvision:NAME` or `timm:NAME` (only where those libraries import).
Weights are a state dict in a `.safetensors` or torch file; pickled whole modules are refused
unless the operator opts in, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import inspect
import io
import os
import pickletools
import struct
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save
from torch import nn

from search.errors import ArchtreeError, a_or_an, first_line
from search.zoo import BUILTIN_MODELS, builtin_names

SOURCE_FORMS = "builtin:NAME, module:package.module:callable, torchvision:NAME, timm:NAME"
# How many offending keys an error message names before summarising the rest.
KEYS_SHOWN = 3


@dataclass(frozen=True)
class ModelRef:
    """Which model to build: its source string and the classifier / input sizes."""

    source: str
    num_classes: int
    in_channels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRef:
        try:
            return cls(
                source=str(data["source"]),
                num_classes=int(data["num_classes"]),
                in_channels=int(data["in_channels"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise ArchtreeError(
                f"invalid model reference {data!r} ({type(error).__name__}: {error}); "
                "give source, num_classes and in_channels"
            ) from None


def build_model(ref: ModelRef) -> nn.Module:
    """Build the randomly initialised model `ref` names, in eval mode.

    Initialisation follows the global torch seed, so callers seed for repeatability.
    """
    if ref.num_classes < 1 or ref.in_channels < 1:
        raise ArchtreeError(
            f"model {ref.source!r} needs num_classes and in_channels of at least 1, "
            f"got {ref.num_classes} and {ref.in_channels}"
        )
    prefix, _, rest = ref.source.partition(":")
    if prefix not in _BUILDERS or not rest:
        raise ArchtreeError(unknown_source_message(ref.source, list(SOURCE_PREFIXES)))
    model = _BUILDERS[prefix](rest, ref)
    if not isinstance(model, nn.Module):
        raise ArchtreeError(
            f"model source {ref.source!r} returned {a_or_an(type(model).__name__)}, not a torch "
            "nn.Module; make it return the model"
        )
    return model.eval()


def check_prunable_form(model: nn.Module, source: str) -> None:
    """Refuse a TorchScript or torch.compile'd model for pruning (`measure` times them)."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ArchtreeError(
            f"model source {source!r} returned a TorchScript module, whose layers cannot be "
            "pruned: return the model before torch.jit.script or trace, and script the pruned "
            "model afterwards"
        )
    if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
        raise ArchtreeError(
            f"model source {source!r} returned a torch.compile'd model: return the model "
            "before torch.compile, and compile the pruned model afterwards (every candidate "
            "would be compiled again, for each timing and fine-tune: minutes each)"
        )


# Files users give as a model when the model is its code and the file its weights.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl")


def looks_like_path(source: str) -> bool:
    """Whether a --model value is written as a file or folder path rather than a source."""
    return "/" in source or "\\" in source or source.startswith(("~", "."))


def unknown_source_message(source: str, prefixes: list[str]) -> str:
    """Why `source` names no model, with the form the user most likely meant. Read from the
    text alone: the service must not look up a client's paths on its own disk."""
    forms = f"accepted forms: {SOURCE_FORMS} (see `archtree models` for the builtin names)"
    prefix, colon, rest = source.partition(":")
    if source.lower().endswith(WEIGHT_SUFFIXES):
        return (
            f"{source!r} names a weights file, not a model source: give the code that builds "
            f"the model as --model ({SOURCE_FORMS}) and the weights file as --weights"
        )
    if looks_like_path(source):
        return (
            f"{source!r} is a path, not a model source (only `archtree measure` takes a result "
            f"folder); {forms}"
        )
    if colon and not rest and prefix in prefixes:
        return f"model source {source!r} names no model after '{prefix}:'; {forms}"
    if colon and rest:
        close = difflib.get_close_matches(prefix.lower(), prefixes, n=1)
        if close:
            name = _builtin_meant(rest) or rest if close[0] == "builtin" else rest
            return f"unknown model source {source!r}: did you mean '{close[0]}:{name}'? {forms}"
    if not colon:
        if source.lower() in builtin_names():
            meant = f"did you mean 'builtin:{source.lower()}'?"
        else:
            meant = f"say where it comes from, as in 'torchvision:{source}' or 'timm:{source}';"
        return f"unknown model source {source!r}: {meant} {forms}"
    return f"unknown model source {source!r}; {forms}"


def _builtin_meant(name: str) -> str | None:
    """The builtin model `name` most likely means (`VGG`, `vgg16`: vgg), or None."""
    close = difflib.get_close_matches(name.strip().lower(), builtin_names(), n=1)
    return close[0] if close else None


def _build_builtin(name: str, ref: ModelRef) -> nn.Module:
    if name not in BUILTIN_MODELS:
        meant = _builtin_meant(name)
        hint = f"did you mean 'builtin:{meant}'? " if meant else ""
        raise ArchtreeError(
            f"unknown builtin model {name!r}; {hint}known: {', '.join(builtin_names())} "
            "(run `archtree models` to list them)"
        )
    return BUILTIN_MODELS[name].constructor(ref.num_classes, ref.in_channels)


def _build_from_module(spec: str, ref: ModelRef) -> nn.Module:
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute or ":" in module_name:
        raise ArchtreeError(
            f"malformed model source {ref.source!r}; expected module:package.module:callable, "
            "e.g. module:mypkg.models:build_net"
        )
    if looks_like_path(module_name) or module_name.endswith(".py"):
        file = PurePath(module_name.replace("\\", "/"))
        raise ArchtreeError(
            f"model source {ref.source!r} names a file: module: takes a module's dotted name, "
            f"importable here, as in module:{file.stem}:{attribute} with the file's folder on "
            f"PYTHONPATH (PYTHONPATH={file.parent} archtree ...)"
        )
    printed = io.StringIO()
    try:
        # A training script parsing its own arguments at import prints a usage of its own:
        # kept out of the user's terminal, and quoted when the import exits.
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            module = importlib.import_module(module_name)
    except ImportError as error:
        missing = getattr(error, "name", None)
        ours = missing is None or module_name == missing or module_name.startswith(missing + ".")
        if not ours:  # the module was found, and imports something that is not installed
            raise ArchtreeError(
                f"importing module {module_name!r} for {ref.source!r} failed: it imports "
                f"{missing!r}, which is not installed here ({error}); install it"
            ) from None
        raise ArchtreeError(
            f"cannot import module {module_name!r} for {ref.source!r} ({error}); it must be "
            "importable on this machine: install it or add its folder to PYTHONPATH"
        ) from None
    except SystemExit as error:
        said = printed.getvalue().strip().splitlines()
        quoted = f", after printing {said[-1][:120]!r}" if said else ""
        raise ArchtreeError(
            f"importing module {module_name!r} for {ref.source!r} ran a script that exits "
            f"(SystemExit: {error.code}{quoted}); put the script's code under "
            '`if __name__ == "__main__":` so that importing only defines the model'
        ) from None
    except Exception as error:
        raise ArchtreeError(
            f"importing module {module_name!r} for {ref.source!r} failed with "
            f"{type(error).__name__}: {_first_line(error)}; fix that module"
        ) from None
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ArchtreeError(
                f"module {module_name!r} has no attribute {attribute!r}; "
                f"check the callable name in {ref.source!r}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ArchtreeError(
            f"{attribute!r} in module {module_name!r} is a {type(target).__name__}, not "
            "callable; point the source at a function or class that returns an nn.Module"
        )
    try:
        inspect.signature(target).bind()
    except TypeError as error:  # it takes arguments: said as such, not as its failure
        raise ArchtreeError(
            f"{attribute}() from {module_name!r} cannot be called with no arguments ({error}): "
            "point the source at a function that builds the model with none, such as one that "
            "calls it with yours"
        ) from None
    except ValueError:  # no signature to read (a builtin): called to find out
        pass
    try:
        return target()
    except (Exception, SystemExit) as error:
        raise ArchtreeError(
            f"calling {attribute}() from {module_name!r} failed with {type(error).__name__}: "
            f"{_first_line(error)}; fix it there (it is called with no arguments)"
        ) from None


def import_optional(library: str, source: str) -> Any:
    try:
        return importlib.import_module(library)
    # torchvision's CUDA-only wheel fails with RuntimeError, not ImportError.
    except Exception as error:
        install = (
            f"install {library} into this environment (a release made for torch "
            f"{torch.__version__.split('+')[0]}), or "
            if isinstance(error, ModuleNotFoundError) and error.name == library
            else ""
        )
        raise ArchtreeError(
            f"{library} is not usable here ({type(error).__name__}: {_first_line(error)}), so "
            f"{source!r} cannot be built; {install}use a builtin: model or a module: source "
            "instead"
        ) from None


def _build_torchvision(name: str, ref: ModelRef) -> nn.Module:
    torchvision = import_optional("torchvision", ref.source)
    if ref.in_channels != 3:
        raise ArchtreeError(
            f"torchvision models take 3 input channels, but the data has {ref.in_channels}; "
            "use a builtin: or module: model for this data"
        )
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=ref.num_classes)
    except Exception as error:
        raise ArchtreeError(
            f"torchvision cannot build {name!r} ({_first_line(error)}); "
            "see torchvision.models.list_models() for the names"
        ) from None


def _build_timm(name: str, ref: ModelRef) -> nn.Module:
    timm = import_optional("timm", ref.source)
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=ref.num_classes, in_chans=ref.in_channels
        )
    except Exception as error:
        raise ArchtreeError(
            f"timm cannot build {name!r} ({_first_line(error)}); "
            "see timm.list_models() for the names"
        ) from None


# Where training checkpoints keep the model's state dict: Lightning and timm ("state_dict"),
# torchvision's reference scripts ("model"), PyTorch's tutorials ("model_state_dict").
CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")


@dataclass(frozen=True)
class WeightsSizing:
    """What sized a model its weights are checked against, as its errors say it: its input
    channels, its classes, and what goes with a --num-classes that fits the weights."""

    channels: str
    classes: str
    classes_also: str = ""


# `prune` (and a job) sizes a model by its data; `measure` by its options.
SIZED_BY_DATA = WeightsSizing(
    channels="the data's",
    classes="the data's labels, or --num-classes",
    classes_also=", with data labelled for those classes",
)
SIZED_BY_OPTIONS = WeightsSizing(
    channels="the C of --input-shape", classes="--num-classes, 10 unless given"
)


# What builds a model of each source's prefix, and those prefixes (SOURCE_FORMS's).
_BUILDERS = {
    "builtin": _build_builtin,
    "module": _build_from_module,
    "torchvision": _build_torchvision,
    "timm": _build_timm,
}
SOURCE_PREFIXES = tuple(_BUILDERS)


def load_weights(
    model: nn.Module,
    path: str | Path,
    *,
    allow_pickle: bool = False,
    source: str | None = None,
    sized_by: WeightsSizing = SIZED_BY_DATA,
) -> None:
    """Load a state dict from `path` into `model` (strict: same keys and shapes).

    `.safetensors` files, torch state dicts, and checkpoints holding one under a key of
    CHECKPOINT_KEYS are accepted. Pickled whole modules load only with `allow_pickle`. `source`
    names the model in error messages, `sized_by` what gave it its input channels and classes.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ArchtreeError(
            f"weights {str(path)!r} is a folder or a device, not a file: give the weights file"
        )
    if not path.is_file():
        raise ArchtreeError(f"weights file {str(path)!r} does not exist; check the path")
    if not os.access(path, os.R_OK):
        raise ArchtreeError(f"weights file {str(path)!r} is not readable; check its permissions")
    # By content, not name: a torch.save file named .safetensors (a zip archive) is read as
    # what it is.
    named_safetensors = path.suffix == ".safetensors" and not zipfile.is_zipfile(path)
    if named_safetensors or _looks_like_safetensors(path):
        state = _read_safetensors(path)
    else:
        state = _read_torch_file(path, allow_pickle=allow_pickle)
    _check_fits(model, state, path, source or type(model).__name__, sized_by)
    _check_finite(state, path)
    model.load_state_dict(state, strict=True)


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights holding NaN or infinity give a model that predicts one class whatever it sees."""
    broken = [
        name
        for name, tensor in state.items()
        if isinstance(tensor, torch.Tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        more = f" and {len(broken) - 3} more" if len(broken) > 3 else ""
        raise ArchtreeError(
            f"weights file {str(path)!r} has NaN or infinite values in {', '.join(broken[:3])}"
            f"{more}: the training that saved it diverged; save weights from a finite model"
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:
        raise ArchtreeError(
            f"cannot read {str(path)!r} as safetensors ({_first_line(error)}): the file is "
            "corrupt or truncated; save the weights again"
        ) from None


def _looks_like_safetensors(path: Path) -> bool:
    # A safetensors file opens with a little-endian u64 header length, then a JSON object.
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_length < path.stat().st_size


def _read_torch_file(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    try:
        # From an open file: torch hands a path named .safetensors to safetensors.
        with path.open("rb") as handle:
            content = load_tensors_only(handle)
    except Exception as error:
        content = _load_refused_file(path, error, allow_pickle=allow_pickle)
    if isinstance(content, nn.Module):
        content = content.state_dict()
    if isinstance(content, dict):
        for key in CHECKPOINT_KEYS:
            inner = content.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if isinstance(inner, dict):
                content = inner
                break
    if not isinstance(content, dict):
        raise ArchtreeError(
            f"{str(path)!r} holds a {type(content).__name__}, not a state dict; "
            "save the weights with torch.save(model.state_dict(), path)"
        )
    not_tensors = [str(k) for k, v in content.items() if not isinstance(v, torch.Tensor)]
    nested = [key for key in not_tensors if isinstance(content[key], dict)]
    if nested:
        keys = " or ".join(map(repr, CHECKPOINT_KEYS))
        raise ArchtreeError(
            f"{str(path)!r} is a checkpoint with its tensors under {_some(nested)}; the weights "
            f"are read from a state dict, or from one under {keys}: save "
            "torch.save(checkpoint[KEY], path) or torch.save(model.state_dict(), path)"
        )
    if not_tensors:
        raise ArchtreeError(
            f"{str(path)!r} is not a state dict: the values of {_some(not_tensors)} are not "
            "tensors; save the weights with torch.save(model.state_dict(), path)"
        )
    return {str(key): value for key, value in content.items()}


def _load_refused_file(path: Path, error: Exception, *, allow_pickle: bool) -> Any:
    """Explain why a weights-only load failed, or load the pickle when the operator allows."""
    scan = scan_pickle(path)
    if scan is None:
        raise ArchtreeError(
            f"cannot read {str(path)!r} as a weights file ({type(error).__name__}): it is "
            "corrupt, truncated or not a torch/safetensors file; save the weights again"
        ) from None
    if not allow_pickle:
        if scan.is_module:
            raise ArchtreeError(
                f"{str(path)!r} is a pickled whole model, and loading a pickle runs arbitrary "
                "code; re-save it as a state dict (torch.save(model.state_dict(), path)) or "
                "pass --allow-pickle if you trust the file"
            )
        raise ArchtreeError(
            f"{str(path)!r} holds Python objects besides tensors{scan.named()}, and "
            "loading them runs arbitrary code; re-save only the state dict "
            "(torch.save(model.state_dict(), path)) or pass --allow-pickle if you trust the file"
        )
    try:
        with path.open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=False)
    except Exception as pickle_error:
        raise ArchtreeError(
            f"unpickling {str(path)!r} failed ({type(pickle_error).__name__}: "
            f"{_first_line(pickle_error)}); the code that defined the model must be importable "
            "here, or re-save the weights as a state dict"
        ) from None


@dataclass
class PickleScan:
    """What a pickle refers to, read without executing it."""

    globals: list[str]
    is_module: bool

    def named(self) -> str:
        """The objects it refers to, in brackets after a space, a few at most; empty when
        none was read (a pickle can build their names on its stack)."""
        return f" ({_some(self.globals)})" if self.globals else ""


def load_tensors_only(
    file: str | Path | BinaryIO, allowed: tuple[type, ...] = (), mmap: bool = False
) -> object:
    """torch.load with weights_only: tensors and plain containers, never arbitrary objects,
    and instances of the `allowed` classes, built without running their code. With `mmap`,
    a file in torch's zip format is mapped, not read: its tensors take memory as they are
    read (a file of the older format is read whole). Its warning about a pickle protocol
    newer than torch's own is not passed on: whatever the protocol, such a file loads or is
    refused with its own message."""
    with warnings.catch_warnings(), torch.serialization.safe_globals(list(allowed)):
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        if mmap and isinstance(file, (str, Path)) and zipfile.is_zipfile(file):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(file, map_location="cpu", weights_only=True)


def scan_pickle(path: Path) -> PickleScan | None:
    """Read the pickle's opcodes without executing them; None when it is not a pickle."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return None
                data = archive.read(names[0])
        else:
            data = path.read_bytes()
        stream = io.BytesIO(data)
    except (OSError, zipfile.BadZipFile, KeyError, RuntimeError):
        return None
    found_globals: list[str] = []
    strings: set[str] = set()
    pickles = 0
    # The legacy torch format is several pickles in a row followed by raw tensor bytes.
    while stream.tell() < len(data):
        # Protocol 4 and above name an object by the two strings pushed before STACK_GLOBAL,
        # often through the memo: the values pushed, strings or None, and the memo's.
        pushed: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                name = opcode.name
                if name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found_globals.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                    found_globals.append(f"{pushed[-2]}.{pushed[-1]}")
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                    continue
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                    continue
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                    continue
                elif isinstance(arg, str):
                    strings.add(arg)
                    pushed.append(arg)
                    continue
                pushed.append(None)
        except Exception:
            break
        pickles += 1
    if pickles == 0:
        return None
    # Every pickled nn.Module carries its __dict__, whose keys include these.
    is_module = {"_modules", "_parameters"} <= strings
    # Name the globals that made the weights-only load refuse, not the tensor plumbing.
    unusual = [g for g in dict.fromkeys(found_globals) if not _tensor_plumbing(g)]
    return PickleScan(globals=unusual or found_globals, is_module=is_module)


# torch's dtypes by name (float32, bfloat16, ...), as a pickle names them (torch.float32).
_DTYPE_NAMES = frozenset(
    str(value).removeprefix("torch.")
    for value in vars(torch).values()
    if isinstance(value, torch.dtype)
)


def _tensor_plumbing(name: str) -> bool:
    """Whether a global a pickle names is how any torch file stores tensors (their rebuild
    functions, storages, dtypes, ordered dicts), rather than an object of its own."""
    return (
        name.startswith(("torch._", "collections.", "__builtin__.", "builtins."))
        or name.endswith("Storage")
        or name in ("torch.Size", "torch.device")
        or (name.startswith("torch.") and name.removeprefix("torch.") in _DTYPE_NAMES)
    )


def _check_fits(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    source: str,
    sized_by: WeightsSizing,
) -> None:
    expected = model.state_dict()
    _strip_wrapper_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_keys = [k for k, v in expected.items() if k in state and state[k].shape != v.shape]
    wrong_shape = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in wrong_keys
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {_some(wrong_shape)}")
    if problems:
        hint = "use the model the weights were saved from: the same source, number of " + (
            f"classes and input channels ({sized_by.channels})"
        )
        if not missing and not unexpected:
            if _looks_pruned(state, expected):
                hint = _pruned_result_hint(path)
            else:
                hint = _end_layer_hint(model, state, wrong_keys, source, sized_by) or hint
        raise ArchtreeError(
            f"weights in {str(path)!r} do not fit model {source}: {'; '.join(problems)}; {hint}"
        )


def _end_layer_hint(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    wrong_keys: list[str],
    source: str,
    sized_by: WeightsSizing,
) -> str | None:
    """What to change when only the model's last layer (its classes) or its first (its input
    channels) differs from the weights; None otherwise."""
    with_parameters = [
        name
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    if not with_parameters:
        return None
    layers = {key.rpartition(".")[0] for key in wrong_keys}
    expected = model.state_dict()
    if layers == {with_parameters[-1]}:
        weight = f"{with_parameters[-1]}.weight"
        if weight in wrong_keys and state[weight].shape[1:] == expected[weight].shape[1:]:
            classes, built = state[weight].shape[0], expected[weight].shape[0]
            if source.startswith("module:"):  # its factory decides, not --num-classes
                return (
                    f"the weights classify {classes} classes and the model {source} builds "
                    f"{built}: have its factory build a model of {classes} outputs, or give "
                    "the weights of the model it builds"
                )
            return (
                f"the weights classify {classes} classes and the model {built} "
                f"({sized_by.classes}): give --num-classes {classes}{sized_by.classes_also}"
            )
    if layers == {with_parameters[0]}:
        weight = f"{with_parameters[0]}.weight"
        if weight in wrong_keys and state[weight].dim() > 1 and expected[weight].dim() > 1:
            file_in, model_in = state[weight].shape[1], expected[weight].shape[1]
            if file_in != model_in and state[weight].shape[0] == expected[weight].shape[0]:
                return (
                    f"the weights take {file_in} input channels and the model {model_in} "
                    f"({sized_by.channels}): give inputs of {file_in} channels"
                )
    return None


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> None:
    """Remove, in place, the leading names every key of `state` shares when more of the
    model's keys are what remains: weights saved from a wrapper around the model, such as
    DataParallel (`module.`), torch.compile (`_orig_mod.`) or a training module holding it
    (`model.`). A mismatch left is then told in the model's names."""
    keys = list(state)
    while keys and set(keys) != expected and all("." in key for key in keys):
        first = {key.split(".", 1)[0] for key in keys}
        if len(first) != 1:
            break
        keys = [key.split(".", 1)[1] for key in keys]
    if len(expected.intersection(keys)) > len(expected.intersection(state)):
        renamed = dict(zip(keys, state.values(), strict=True))
        state.clear()
        state.update(renamed)


def _looks_pruned(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    """Whether `state` holds a pruned version of the model's tensors: each as large or
    narrower, and more of them narrower than another number of classes (an output layer's
    weight and bias) or of input channels (the first layer's weight) would make."""
    narrower = 0
    for key, tensor in expected.items():
        shape = state[key].shape
        if len(shape) != tensor.dim() or any(
            a > b for a, b in zip(shape, tensor.shape, strict=True)
        ):
            return False
        narrower += shape != tensor.shape
    return narrower > 2


def _pruned_result_hint(path: Path) -> str:
    """What to do with the weights of a pruned model, which fit no unpruned one."""
    folder = path.parent if (path.parent / "arch.json").is_file() else None
    named = f"its folder {str(folder)!r}" if folder else "the folder prune or fetch wrote"
    return (
        "they look like a pruned model's (narrower layers), which only its own architecture "
        f"spec rebuilds: give {named}, holding arch.json and model.safetensors, as --model of "
        "archtree measure, or load it with search.load_pruned"
    )


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Save the model's state dict as safetensors (tied weights are stored once per key)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Cloning gives every key its own contiguous storage, which safetensors requires.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # Written as any file is, so it gets the same permissions as arch.json and report.json
    # (save_file leaves it readable by its owner only).
    path.write_bytes(save(state, metadata={"format": "pt"}))


def describe_builtin_models() -> list[dict[str, Any]]:
    """Name, family, description and parameter count (1x28x28 input, 10 classes) per model."""
    rows = []
    for entry in BUILTIN_MODELS.values():
        model = entry.constructor(10, 1)
        rows.append(
            {
                "name": entry.name,
                "family": entry.family,
                "description": entry.description,
                "params": sum(p.numel() for p in model.parameters()),
            }
        )
    return rows


def _some(items: list[str]) -> str:
    shown = ", ".join(items[:KEYS_SHOWN])
    more = len(items) - KEYS_SHOWN
    return f"{shown} (+{more} more)" if more > 0 else shown


def _first_line(error: BaseException) -> str:
    return first_line(error)[:200] or type(error).__name__
