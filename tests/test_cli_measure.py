"""`archtree measure`: a model's latency on this machine, as the search times it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests.cli_process import archtree, one_line_error


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def test_measure_times_a_model_of_feature_vectors(home):
    result = archtree(
        "measure", "--model", "module:tests.non_image_models:feature_net", "--input-shape", "12",
        home=home,
    )  # fmt: skip
    assert "setup      batch 1, input (12,), 1 thread(s)" in result.stdout
    assert re.search(r"median\s+[0-9.]+ ms", result.stdout)


def test_measure_prints_the_statistics(home):
    result = archtree("measure", "--model", "builtin:vgg", "--input-shape", "1,16,16", home=home)
    for word in ("median", "p90", "IQR", "CV", "runs"):
        assert word in result.stdout
    median = float(next(line for line in result.stdout.splitlines() if line.startswith("median"))
                   .split()[1])  # fmt: skip
    assert median > 0


def test_measure_tells_a_gpu_timing_the_host_sets_from_one_the_gpu_sets():
    from archtree_cli.commands import _launch_line
    from search.interfaces import TimingStats

    def stats(launch_ms: float) -> TimingStats:
        return TimingStats(
            median_ms=2.0, p90_ms=2.1, iqr_ms=0.1, cv=0.04, n=50, launch_ms=launch_ms
        )

    waiting = _launch_line(stats(1.9))
    assert waiting.startswith("1.9000 ms of each run launching kernels from the host (95%)")
    assert "launch-bound" in waiting and "larger --batch-size" in waiting
    working = _launch_line(stats(0.5))
    assert "(25%)" in working and "launch-bound" not in working


def test_measure_says_when_it_shows_a_cached_timing_and_fresh_times_again(tmp_path):
    home = tmp_path / "home"  # a cache of its own

    def measured(*extra: str) -> tuple[str, bool]:
        result = archtree(
            "measure", "--model", "builtin:vgg", "--input-shape", "1,16,16", *extra, home=home
        )
        assert result.stderr.startswith("measuring builtin:vgg at batch 1, input (1, 16, 16)")
        median = next(line for line in result.stdout.splitlines() if line.startswith("median"))
        return median, "cached     yes" in result.stdout

    first, first_cached = measured()
    again, again_cached = measured()
    assert (first_cached, again_cached) == (False, True) and again == first
    fresh, fresh_cached = measured("--fresh")
    assert not fresh_cached
    # The fresh timing replaced the one kept: it is what the next run shows.
    assert measured() == (fresh, True)


def pruned_vgg_result(folder: Path, input_shape: tuple[int, ...] = (1, 16, 16)) -> Path:
    """A result folder as prune writes it: the builtin VGG with its last conv narrowed."""
    from search.arch_spec import spec_of
    from search.artifacts import save_artifacts
    from search.model_source import ModelRef, build_model
    from search.pruning import PrunableModel

    ref = ModelRef("builtin:vgg", num_classes=10, in_channels=input_shape[0])
    model = build_model(ref)
    PrunableModel(model, torch.zeros(1, *input_shape)).remove({"features.5.0": range(32)})
    return save_artifacts(folder, spec_of(model, ref, input_shape), model, {})


def test_measure_times_a_result_folder_on_its_own_input_shape(tmp_path, home):
    result = pruned_vgg_result(tmp_path / "pruned")
    timed = archtree("measure", "--model", str(result), home=home)
    assert "input (1, 16, 16)" in timed.stdout and "builtin:vgg pruned, arch" in timed.stdout
    assert float(re.search(r"^median\s+(\S+) ms", timed.stdout, re.M).group(1)) > 0
    # Its weights fit no unpruned model: the error says to give the folder instead.
    line = one_line_error(
        archtree("measure", "--model", "builtin:vgg", "--weights",
                 str(result / "model.safetensors"), "--input-shape", "1,16,16", home=home,
                 check=False)
    )  # fmt: skip
    assert "shape mismatch" in line and f"give its folder '{result}'" in line
    assert "as --model of archtree measure" in line
    refused = archtree("measure", "--model", str(result), "--weights", "w.pt", home=home,
                       check=False)  # fmt: skip
    assert "--weights is not used with a result folder" in one_line_error(refused)


def test_measure_refuses_a_batch_whose_activations_outgrow_the_memory(home):
    from search.memory import available_memory_bytes

    available = available_memory_bytes()
    if available is None:
        pytest.skip("this machine does not say how much memory it has available")
    # The digits VGG's first layer makes 32 channels of each 64x64 input: 260 bytes per pixel
    # of the batch with its input, 4 of them the input's, which stays under its own 2 GiB.
    batch = math.ceil(1.5 * available / 260 / (64 * 64))
    if 4 * batch * 64 * 64 > 2 * 1024**3:
        pytest.skip("this machine has more memory than an input under 2 GiB can outgrow")
    result = archtree(
        "measure", "--model", "builtin:vgg", "--input-shape", "1,64,64", "--batch-size",
        str(batch), home=home, check=False,
    )  # fmt: skip
    line = one_line_error(result)
    assert f"builtin:vgg at --batch-size {batch} and --input-shape 1,64,64 needs about" in line
    assert "GiB this machine has available: give a smaller --batch-size" in line


def test_measure_times_a_torchscript_model(home):
    timed = archtree(
        "measure", "--model", "module:tests.odd_models:scripted_vgg", "--input-shape", "1,8,8",
        home=home,
    )  # fmt: skip
    assert float(re.search(r"^median\s+(\S+) ms", timed.stdout, re.M).group(1)) > 0


def test_a_cached_timing_is_not_used_once_the_models_code_has_changed(tmp_path):
    home, code = tmp_path / "home", tmp_path / "code"
    code.mkdir()

    def write(forward: str) -> None:
        (code / "mynet.py").write_text(
            "from torch import nn\n\n\n"
            "class Net(nn.Module):\n"
            "    def __init__(self):\n"
            "        super().__init__()\n"
            "        self.fc = nn.Linear(12, 3)\n\n"
            "    def forward(self, x):\n"
            f"        return {forward}\n\n\n"
            "def net():\n"
            "    return Net()\n"
        )

    def cached() -> bool:
        result = archtree("measure", "--model", "module:mynet:net", "--input-shape", "12",
                          home=home, extra_path=code)  # fmt: skip
        return "cached     yes" in result.stdout

    write("self.fc(x)")
    assert [cached(), cached()] == [False, True]
    # The same layers, a forward that does more: its timing is not the one kept.
    write("self.fc(x.exp().log() + x.sin() * 0)")
    assert [cached(), cached()] == [False, True]
