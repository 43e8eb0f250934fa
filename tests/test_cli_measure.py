"""`archtree measure`: a model's latency on this machine, as the search times it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_process import archtree, main_here, one_line_error


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


def test_measure_refuses_num_classes_for_a_model_of_ones_own_as_prune_does(home):
    source = "module:tests.non_image_models:feature_net"
    result = archtree(
        "measure", "--model", source, "--input-shape", "12", "--num-classes", "7", home=home,
        check=False,
    )  # fmt: skip
    assert one_line_error(result) == (
        f"archtree: error: --num-classes 7 does not apply to {source}, which builds its own "
        "model: leave --num-classes out (it sizes builtin, torchvision and timm models)."
    )


def archtree_limited(*args: str, home: Path, address_space_gib: float):
    """`archtree ARGS` under `ulimit -v`: what a shared machine or a job scheduler allows it,
    `address_space_gib` more than a process that has imported the command and torch takes
    (its thread pools and a CUDA build's libraries take more on some machines)."""
    import shlex

    from tests.cli_process import ROOT

    probe = subprocess.run(
        [sys.executable, "-c", "import torch, archtree_cli.commands; "
         "print(open('/proc/self/status').read().split('VmSize:')[1].split()[0])"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )  # fmt: skip
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "archtree_cli.main", *args))
    kib = int(probe.stdout) + int(address_space_gib * 1024**2)
    return subprocess.run(
        ["bash", "-c", f"ulimit -v {kib} && exec {command}"],
        capture_output=True,
        text=True,
        env={**os.environ, "ARCHTREE_HOME": str(home), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=600,
    )


def test_a_batch_beyond_the_address_space_ulimit_allows_is_refused_as_one(home, tmp_path):
    """The machine has the memory, the process may not use it: said as such, before the batch
    is built (it was a shape the model rejects, the allocation failing in its forward pass),
    by measure and by prune, which timed it."""
    said = "limit where lower): give a smaller --batch-size"
    measured = archtree_limited(
        "measure", "--model", "builtin:resnet", "--input-shape", "1,28,28", "--batch-size",
        "20000", home=home, address_space_gib=3,
    )  # fmt: skip
    line = one_line_error(measured)
    assert "builtin:resnet at --batch-size 20000 and --input-shape 1,28,28 needs about" in line
    assert said in line and "rejects" not in line
    pruned = archtree_limited(
        "prune", "--model", "builtin:resnet", "--data", "builtin:mnist", "--budget", "60%",
        "--batch-size", "20000", "--out", str(tmp_path / "out"), home=home, address_space_gib=3,
    )  # fmt: skip
    line = one_line_error(pruned)
    assert "builtin:resnet at --batch-size 20000 and inputs of shape (1, 28, 28) from " in line
    assert said in line and "baseline" not in pruned.stderr
    assert not (tmp_path / "out").exists()


def test_a_long_timing_says_how_far_it_has_got(tmp_path, monkeypatch, capsys):
    """Every TIMING_PROGRESS_EVERY_S (10 s): here after every run, in this process."""
    from archtree_cli import commands

    monkeypatch.setattr(commands, "TIMING_PROGRESS_EVERY_S", 0.0)
    command = ["measure", "--model", "builtin:vgg", "--input-shape", "1,8,8",
               "--cache-dir", str(tmp_path)]  # fmt: skip
    assert main_here(command) == 0
    printed = capsys.readouterr()
    said = printed.err.splitlines()
    assert said[0].startswith("measuring builtin:vgg at batch 1")
    # The statistics count the timed runs, the progress the warm-up too: said so, not a
    # count that seemed to drop from the progress's last to the summary's.
    timed = int(re.search(r"^runs +(\d+) timed, after warm-up runs", printed.out, re.M)[1])
    runs = [int(re.match(r"  timed ([0-9,]+)", line)[1].replace(",", "")) for line in said[1:]]
    assert runs == list(range(1, len(runs) + 1)) and len(runs) >= 35
    assert said[1].startswith("  timed 1 of at least 35 runs (")
    assert said[35].startswith("  timed 35 runs (")
    assert said[35].endswith("s a run), at least 35 planned: more while their times vary")
    assert timed < runs[-1]
    assert main_here(command) == 0  # from the cache: nothing timed, nothing said
    assert capsys.readouterr().err == ""


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
        median = next(line for line in result.stdout.splitlines() if line.startswith("median"))
        cached = "cached     yes" in result.stdout
        # It says it measures only when it does.
        measuring = "measuring builtin:vgg at batch 1, input (1, 16, 16)" in result.stderr
        assert measuring != cached, result.stderr
        return median, cached

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
    for option in (["--weights", "w.pt"], ["--allow-pickle"]):
        refused = archtree("measure", "--model", str(result), *option, home=home, check=False)
        assert f"{option[0]} is not used with a result folder" in one_line_error(refused)


def test_measures_weights_errors_name_its_own_options(tmp_path, home):
    """`measure` sizes the model by --input-shape and --num-classes, not by data."""
    from search.model_source import ModelRef, build_model

    for saved, said in [
        (ModelRef("builtin:vgg", 10, 3), "the model 1 (the C of --input-shape): give inputs of 3"),
        (ModelRef("builtin:vgg", 100, 1), "the model 10 (--num-classes, 10 unless given): give "
         "--num-classes 100"),
    ]:  # fmt: skip
        torch.save(build_model(saved).state_dict(), tmp_path / "w.pt")
        refused = archtree("measure", "--model", "builtin:vgg", "--weights",
                           str(tmp_path / "w.pt"), "--input-shape", "1,16,16", home=home,
                           check=False)  # fmt: skip
        line = one_line_error(refused)
        assert said in line and "data" not in line, line


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
    assert "limit where lower): give a smaller --batch-size" in line


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


def test_timings_of_code_the_cache_cannot_tell_apart_are_never_taken_from_it(tmp_path):
    """A module imported from a zip archive (its file cannot be read to tell an edit), and a
    TorchScript module (loaded from a file of its own, perhaps): each timing is taken anew."""
    import zipfile

    home = tmp_path / "home"
    archive = tmp_path / "models.zip"
    with zipfile.ZipFile(archive, "w") as packed:
        packed.writestr("zipped_net.py", "from torch import nn\n\ndef net():\n"
                        "    return nn.Linear(12, 3)\n")  # fmt: skip

    def cached(model: str, shape: str, extra_path: Path | None = None) -> bool:
        result = archtree("measure", "--model", model, "--input-shape", shape, home=home,
                          extra_path=extra_path)  # fmt: skip
        return "cached     yes" in result.stdout

    assert [cached("module:zipped_net:net", "12", archive) for _ in range(2)] == [False, False]
    scripted = "module:tests.odd_models:scripted_vgg"
    assert [cached(scripted, "1,8,8") for _ in range(2)] == [False, False]
    assert [cached("builtin:vgg", "1,8,8") for _ in range(2)] == [False, True]  # as before


def test_measure_refuses_a_file_of_a_result_folder_and_says_to_give_the_folder(tmp_path, home):
    result = pruned_vgg_result(tmp_path / "pruned")
    for name in ("arch.json", "model.safetensors"):
        refused = archtree("measure", "--model", str(result / name), home=home, check=False)
        line = one_line_error(refused)
        said = f"is a file of the result folder {result}: give its folder, --model {result}/"
        assert said in line
        assert "not a model source" not in line and "only `archtree measure`" not in line


def test_a_bad_input_shape_in_a_results_arch_json_is_blamed_on_the_file(tmp_path, home):
    import json
    import shutil

    good = pruned_vgg_result(tmp_path / "pruned")
    damaged = tmp_path / "edited"
    shutil.copytree(good, damaged)
    arch = json.loads((damaged / "arch.json").read_text())
    for shape, said in (
        ([0, 8, 8], f"{damaged / 'arch.json'} is not a valid architecture spec (its `input_shape` "
         "is [0, 8, 8], not a list of sizes of 1 or more): save the result again with `archtree "
         "prune`"),
        ([16, 16], f"the input_shape of {damaged / 'arch.json'} is [16, 16], not an image's "
         "C,H,W"),
    ):  # fmt: skip
        (damaged / "arch.json").write_text(json.dumps({**arch, "input_shape": shape}))
        line = one_line_error(archtree("measure", "--model", str(damaged), home=home, check=False))
        assert said in line and "save the result again with `archtree prune`" in line
        assert "--input-shape '" not in line and "give --input-shape as" not in line
    # An --input-shape the user gave keeps its own message.
    given = archtree(
        "measure", "--model", str(good), "--input-shape", "0,8,8", home=home, check=False
    )
    assert "error: --input-shape '0,8,8' is not one sample's shape" in one_line_error(given)


FORWARD_PEAK = """
import sys, torch
from search.model_source import ModelRef, build_model
from search.timing_input import timing_input

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(l.split()[1]) * 1024 for l in lines if l.startswith(field + ":"))

model = build_model(ModelRef("builtin:resnet", num_classes=10, in_channels=1)).eval()
with torch.inference_mode():
    model(timing_input(2, (1, 28, 28)))
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")
before = status("VmRSS")
with torch.inference_mode():
    model(timing_input(int(sys.argv[1]), (1, 28, 28)))
print(status("VmHWM") - before)
"""


def test_measure_refuses_a_batch_whose_forward_pass_peaks_above_the_memory_available(
    tmp_path, monkeypatch
):
    """The memory a batch needs counts the convolutions' work buffers (im2col), which make
    the ResNet's peak about 2.3x its activations, and is found before the batch is built."""
    import subprocess
    import sys

    import search.memory
    import search.timing_input
    from archtree_cli.commands import run_measure
    from archtree_cli.main import build_parser
    from search.errors import ArchtreeError
    from tests.cli_process import ROOT

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("this system does not let a process measure its peak memory")
    batch = 512  # about 200 MB at its peak: its input, activations and work buffers
    peak = int(
        subprocess.run(
            [sys.executable, "-c", FORWARD_PEAK, str(batch)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout  # fmt: skip
    )
    # What the activations alone are (the input, the largest layer output, 24 channels of
    # 28x28, and its input): short of the peak, so a check counting only them lets it through.
    assert 4 * batch * (28 * 28 + 2 * 24 * 28 * 28) < peak
    monkeypatch.setattr(search.memory, "available_memory_bytes", lambda: peak)
    monkeypatch.setenv("ARCHTREE_HOME", str(tmp_path))
    built = []
    timing_input = search.timing_input.timing_input

    def recorded(batch_size, *args, **kwargs):
        built.append(batch_size)
        return timing_input(batch_size, *args, **kwargs)

    monkeypatch.setattr(search.timing_input, "timing_input", recorded)
    args = build_parser().parse_args(
        ["measure", "--model", "builtin:resnet", "--batch-size", str(batch)]
    )
    with pytest.raises(ArchtreeError) as refused:
        run_measure(args)
    message = str(refused.value)
    said = f"builtin:resnet at --batch-size {batch} and --input-shape 1,28,28 needs about"
    assert said in message
    needed = float(re.search(r"needs about ([0-9.]+) GiB", message).group(1)) * 1024**3
    assert needed >= 0.99 * peak  # not below the measured peak (given to 3 digits)
    fits = int(re.search(r"at most --batch-size (\d+) fits", message).group(1))
    assert 1 <= fits < batch
    assert max(built) <= 32  # refused before the batch was built: probes of 16 and 32 only


class WideConvolution(torch.nn.Module):
    """A 1024-channel 3x3 convolution over 4x4 inputs: each batched call lays its 36 MiB of
    weights out anew for its kernel, whatever the batch, and each sample adds 0.2 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 1024, 1)
        self.wide = torch.nn.Conv2d(1024, 1024, 3, padding=1)
        self.head = torch.nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.wide(self.stem(x))).mean((2, 3)))


def test_a_batch_is_not_refused_for_what_each_call_takes_once(monkeypatch):
    """A forward pass's fixed part (a wide layer's weights laid out for its kernel), measured on
    16 samples and counted again for each of the batch's, refused batches that fit: 25 GiB
    said needed for a wide model's batch that took 1.3."""
    import search.memory
    from archtree_cli.commands import _check_activations_fit
    from search.errors import ArchtreeError

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("this system does not let a process measure its peak memory")
    monkeypatch.setattr(search.memory, "available_memory_bytes", lambda: 1024**3)
    model = WideConvolution().eval()
    # At 16 samples' rate, 2 GiB and more for 1024 samples; about 0.3 GiB in fact.
    _check_activations_fit(model, (1, 4, 4), None, 1024, "module:wide", "--input-shape 1,4,4")
    with pytest.raises(ArchtreeError) as refused:  # a batch that does not fit still does not
        _check_activations_fit(
            model, (1, 4, 4), None, 100_000, "module:wide", "--input-shape 1,4,4"
        )
    fits = int(re.search(r"at most --batch-size (\d+) fits", str(refused.value)).group(1))
    assert 1024 < fits < 100_000
