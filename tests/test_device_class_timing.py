"""The agents of a device class time alike: one that would time otherwise (other threads,
another runtime version) is refused while they are online, and timings its class cached with
other settings are not reused once it serves. Real Redis and real agent processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from latency.device_registry import DeviceClassConflict, DeviceRegistry
from latency.remote_oracle import RemoteOracle
from search.arch_spec import spec_of
from search.errors import ArchtreeError
from search.model_source import ModelRef, build_model
from search.pruning import PrunableModel
from tests.redis_fixtures import ROOT, wait_until

pytest_plugins = ["tests.redis_fixtures"]

AGENT_START_S = 60.0
VGG = ModelRef("builtin:vgg", num_classes=10, in_channels=1)
INPUT_SHAPE = (1, 28, 28)


def info(device_class: str, threads: int, runtime_version: str = "2.13.0") -> dict:
    return {
        "device_class": device_class,
        "host": "bench-7",
        "runtime": "torch",
        "runtime_version": runtime_version,
        "cpu": "x86",
        "gpu": None,
        "threads": threads,
    }


def test_an_agent_that_would_time_otherwise_than_its_class_online_is_refused(redis_client):
    registry = DeviceRegistry(redis_client)
    first = registry.register(info("alike-cpu", 1))["id"]
    assert registry.class_timing("alike-cpu") == {
        "runtime": "torch",
        "runtime_version": "2.13.0",
        "threads": 1,
    }

    with pytest.raises(DeviceClassConflict) as refused:
        registry.register(info("alike-cpu", 2))
    assert str(refused.value) == (
        "device class alike-cpu has agents online that time with torch 2.13.0 on 1 thread, and "
        "this one would time with torch 2.13.0 on 2 threads: the agents of a class take each "
        "other's measurements, so they must time alike; run this one with --threads 1, or give "
        "it a device class of its own"
    )
    with pytest.raises(DeviceClassConflict, match="run this one with torch 2.13.0, or give"):
        registry.register(info("alike-cpu", 1, runtime_version="2.14.1"))
    # Agents that build other module: sources would fail a job on some requests only.
    with pytest.raises(DeviceClassConflict) as refused:
        registry.register(info("alike-cpu", 1) | {"allowed_modules": ["mynets"]})
    assert "this one would time with torch 2.13.0 on 1 thread, building module: sources of " in (
        str(refused.value)
    )
    assert str(refused.value).endswith(
        "mynets: the agents of a class take each other's measurements, so they must time "
        "alike; run this one with no --allow-module, or give it a device class of its own"
    )
    # Nothing was written for the refused; another class, or the same settings, are welcome.
    assert [record["id"] for record in registry.list()] == [first]
    registry.register(info("other-cpu", 4))
    registry.register(info("alike-cpu", 1))

    # Once the class's agents are offline, it may time otherwise from then on.
    for record in registry.list():
        registry.stop(record["id"])
    registry.register(info("alike-cpu", 2) | {"allowed_modules": ["mynets", "lab.nets"]})
    assert registry.class_timing("alike-cpu")["threads"] == 2
    with pytest.raises(DeviceClassConflict, match="with --allow-module lab.nets --allow-module"):
        registry.register(info("alike-cpu", 2) | {"allowed_modules": ["mynets"]})


def start_cli_agent(redis_url: str, device_class: str, threads: int, log: Path, *more: str):
    """`archtree agent --redis-url URL --device-class CLASS --threads N [MORE]`, output in
    `log`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "archtree_cli.main", "agent", "--redis-url", redis_url,
               "--device-class", device_class, "--threads", str(threads), *more]  # fmt: skip
    with open(log, "wb") as output:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=output)


def vgg_pair():
    """The unpruned builtin VGG and a version with fewer channels in its last conv."""
    reference = spec_of(build_model(VGG), VGG, INPUT_SHAPE)
    model = build_model(VGG)
    PrunableModel(model, torch.zeros(1, *INPUT_SHAPE)).remove({"features.5.0": range(32)})
    return reference, spec_of(model, VGG, INPUT_SHAPE)


def test_timings_cached_with_other_threads_are_not_reused_and_mixed_agents_are_refused(
    redis_url: str, redis_client, tmp_path: Path
):
    device_class = "threads-cpu"
    registry = DeviceRegistry(redis_client)
    reference, candidate = vgg_pair()
    oracle = RemoteOracle(redis_client, device_class, timeout_s=120, poll_s=0.05)
    agents: list[subprocess.Popen] = []
    try:
        agents.append(start_cli_agent(redis_url, device_class, 1, tmp_path / "one.log"))
        wait_until(lambda: registry.live_agents(device_class) == 1, AGENT_START_S, "an agent")
        first = oracle.measure(candidate, reference)
        assert not first.cached and first.fingerprint["threads"] == 1
        assert oracle.measure(candidate, reference).cached  # the same agent: reused

        # An agent of two threads is refused while the one-thread agent serves the class.
        refused = start_cli_agent(redis_url, device_class, 2, tmp_path / "refused.log")
        assert refused.wait(timeout=AGENT_START_S) == 2
        said = (tmp_path / "refused.log").read_text()
        assert "archtree: error: device class threads-cpu has agents online that time with" in (
            said
        )
        assert "run this one with --threads 1, or give it a device class of its own" in said

        agents[0].terminate()
        assert agents[0].wait(timeout=30) == 0
        agents.append(start_cli_agent(redis_url, device_class, 2, tmp_path / "two.log"))
        wait_until(lambda: registry.live_agents(device_class) == 1, AGENT_START_S, "agent two")
        again = oracle.measure(candidate, reference)
        assert not again.cached and again.fingerprint["threads"] == 2
        assert oracle.measurements == 2
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=30)


def test_a_module_model_the_agents_of_its_class_online_do_not_build_is_refused(redis_client):
    from api.schemas import JobSpecIn
    from api.submission import check_agents_build

    registry = DeviceRegistry(redis_client)

    def spec(model: str) -> JobSpecIn:
        return JobSpecIn(model=model, budget="60%", device_class="lab-cpu")

    nets = spec("module:mynets.vision:small")
    check_agents_build(nets, registry)  # none online: those to come are not known yet
    plain = registry.register(info("lab-cpu", 1))["id"]
    with pytest.raises(ArchtreeError) as refused:
        check_agents_build(nets, registry)
    assert str(refused.value) == (
        "the agents of device class lab-cpu online do not build 'module:mynets.vision:small': "
        "module: sources run code on the agents, so they build only the packages they allow; "
        "start them with --allow-module mynets"
    )
    check_agents_build(spec("builtin:vgg"), registry)

    registry.stop(plain)
    registry.register(info("lab-cpu", 1) | {"allowed_modules": ["mynets"]})
    check_agents_build(nets, registry)
    with pytest.raises(ArchtreeError, match="start them with --allow-module othernets"):
        check_agents_build(spec("module:othernets:big"), registry)


def test_an_agent_registers_the_packages_it_builds_and_one_that_builds_others_is_refused(
    redis_url: str, redis_client, tmp_path: Path
):
    registry = DeviceRegistry(redis_client)
    builds = start_cli_agent(
        redis_url, "nets-cpu", 1, tmp_path / "builds.log", "--allow-module", "mynets"
    )
    try:
        wait_until(lambda: registry.live_agents("nets-cpu") == 1, AGENT_START_S, "the agent")
        (record,) = registry.list()
        assert record["allowed_modules"] == ["mynets"]
        refused = start_cli_agent(redis_url, "nets-cpu", 1, tmp_path / "refused.log")
        assert refused.wait(timeout=AGENT_START_S) == 2
        said = (tmp_path / "refused.log").read_text()
        assert "building module: sources of mynets, and this one would time with" in said
        assert "run this one with --allow-module mynets, or give it a device class" in said
    finally:
        builds.terminate()
        builds.wait(timeout=30)
