"""Shared fixtures: small real models and a real local latency oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _private_archtree_home(tmp_path_factory, monkeypatch):
    """Each test session keeps its caches out of the user's home."""
    home = tmp_path_factory.getbasetemp() / "archtree-home"
    monkeypatch.setenv("ARCHTREE_HOME", str(home))
    yield


@pytest.fixture
def example_input() -> torch.Tensor:
    return torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def fast_timing():
    from latency.harness import TimingSettings

    return TimingSettings(warmup_runs=3, warmup_s=0.01, min_runs=10, min_time_s=0.05)


if os.environ.get("TESTS_TORCH_THREADS"):
    torch.set_num_threads(int(os.environ["TESTS_TORCH_THREADS"]))


# The test files that take longest on a 2-core machine (a minute or more each), run first:
# `make test` runs files in parallel, each file on one worker, and one of these started last
# would run alone at the end. Within a file, tests keep their order.
LONGEST_FIRST = (
    "test_bench.py",
    "test_service.py",
    "test_workers.py",
    "test_cli.py",
    "test_dashboard.py",
    "test_cli_bad_input.py",
    "test_agent.py",
    "test_client.py",
    "test_redis_outage.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
