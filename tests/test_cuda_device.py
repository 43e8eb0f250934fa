"""Timing on a CUDA GPU (`--device local:cuda`). Skipped where torch sees no GPU.

Self-contained (no conftest fixtures), so it also runs with `pytest --noconftest` on a GPU
machine that lacks the service's dependencies.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.cli_process import ROOT, run_archtree

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def conv_net(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(64, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(channels, 10),
    )


def test_gpu_timing_measures_the_kernels_not_their_launch():
    from latency.harness import TimingSettings, time_interleaved

    torch.manual_seed(0)
    big, small = conv_net(512).cuda(), conv_net(128).cuda()
    example = torch.randn(32, 64, 56, 56, device="cuda")
    small_stats, big_stats, ratio = time_interleaved(
        small, big, example, TimingSettings(threads=1, min_time_s=0.2)
    )
    # The small net does 1/16 of the big one's convolution work. Without synchronising, both
    # would time only the kernel launches and measure alike.
    assert ratio < 0.5, (small_stats.median_ms, big_stats.median_ms)
    assert big_stats.median_ms > small_stats.median_ms


def test_gpu_timing_tells_the_hosts_launches_from_the_kernels():
    from latency.harness import TimingSettings, time_model
    from search.notes import launch_bound

    settings = TimingSettings(threads=1, min_time_s=0.2)
    torch.manual_seed(0)
    # A small net at batch 1 is all launches; a wide one at batch 32 is all kernel work.
    small = time_model(conv_net(8).cuda(), torch.randn(1, 64, 8, 8, device="cuda"), settings)
    big = time_model(conv_net(512).cuda(), torch.randn(32, 64, 56, 56, device="cuda"), settings)
    assert small.launch_ms is not None and big.launch_ms is not None
    assert launch_bound(small), small
    assert not launch_bound(big), big


def archtree(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with a home of its own. The outer PYTHONPATH stays: on a GPU machine it may
    hold packages carried there."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return run_archtree(*args, home=tmp_path / "home", env={"PYTHONPATH": os.pathsep.join(paths)})


def test_measure_on_the_gpu_names_it_and_tells_a_launch_bound_timing(tmp_path):
    result = archtree(
        tmp_path, "measure", "--model", "builtin:vgg", "--input-shape", "1,16,16",
        "--device", "local:cuda",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    device = next(line for line in result.stdout.splitlines() if line.startswith("device"))
    assert torch.cuda.get_device_name(0) in device
    assert "launch-bound" in result.stdout


def test_local_cuda_oracle_times_pruned_candidates_on_the_gpu():
    from latency.local_oracle import LocalOracle
    from search.arch_spec import build_from_spec, spec_of
    from search.model_source import ModelRef, build_model
    from search.pruning import PrunableModel

    ref = ModelRef("builtin:resnet", num_classes=10, in_channels=3)
    model = build_model(ref).eval()
    example = torch.randn(1, 3, 32, 32)
    pruner = PrunableModel(model, example, min_width_fraction=0.1)
    pruner.remove({g.name: list(range(g.removable)) for g in pruner.groups})
    reference_spec = spec_of(build_model(ref).eval(), ref, (3, 32, 32))
    small_spec = spec_of(pruner.model, ref, (3, 32, 32))

    oracle = LocalOracle(build_from_spec, device="cuda", device_class="local:cuda", batch_size=512)
    reference = oracle.measure_reference(reference_spec)
    measured = oracle.measure(small_spec, reference_spec)
    assert reference.median_ms > 0
    assert 0 < measured.ratio < 0.9
    fingerprint = oracle.fingerprint()
    assert fingerprint["gpu"] == torch.cuda.get_device_name(0)
    assert fingerprint["device_class"] == "local:cuda"


def test_prune_on_the_gpu_meets_a_budget_measured_there(tmp_path):
    generator = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(
        data,
        x=generator.standard_normal((600, 3, 32, 32)).astype(np.float32),
        y=generator.integers(0, 10, 600),
    )
    out = tmp_path / "out"
    result = archtree(
        tmp_path, "prune", "--model", "builtin:resnet", "--data", str(data),
        # On an H200 this batch is still partly launch-bound: the smallest prunable form
        # takes 0.70 of the unpruned latency, and no step of the tree gets below 0.81.
        "--budget", "90%",
        "--device", "local:cuda", "--batch-size", "512", "--width", "2", "--branching", "2",
        "--planned-steps", "2", "--ft-steps", "3", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["device"]["gpu"] == torch.cuda.get_device_name(0)
    assert report["final"]["latency_ms"] <= report["budget_ms"]
    assert report["final"]["macs"] < report["baseline"]["macs"]


def test_training_on_the_gpu_leaves_the_model_trained_and_on_the_cpu():
    from search.compute_device import resolve_train_device
    from search.training import accuracy, logits, train

    device = resolve_train_device("auto")
    assert device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (256,), generator=generator)
    x = torch.randn(256, 64, 8, 8, generator=generator)
    x[torch.arange(256), y] += 2.0  # each class lifts a channel of its own
    model = conv_net(8).eval()
    before = accuracy(model, x, y)
    train(model, x, y, steps=60, lr=0.05, device=device)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert accuracy(model, x, y) > max(before, 0.7)
    # Scored on a copy on the GPU, the outputs come back to the CPU and agree.
    on_gpu = logits(model, x, device=device)
    assert on_gpu.device.type == "cpu"
    assert torch.allclose(on_gpu, logits(model, x), atol=1e-3)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_prune_fine_tunes_on_the_gpu_while_timing_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    result = archtree(
        tmp_path, "prune", "--model", "builtin:vgg", "--data", "builtin:digits",
        "--budget", "70%", "--width", "2", "--branching", "2", "--ft-steps", "5",
        "--train-device", "cuda", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    name = torch.cuda.get_device_name(0)
    assert f"fine-tuning and scoring on cuda:0 ({name})" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["training_device"] == f"cuda:0 ({name})"
    assert report["device"]["device_class"] == "local"
    assert report["final"]["latency_ms"] <= report["budget_ms"]
