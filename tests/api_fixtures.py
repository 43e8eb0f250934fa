"""The API as a real uvicorn process for tests, on the private Redis of tests.redis_fixtures.

`start_api(env, log_dir)` runs `python -m uvicorn api.main:app` (or, given `workers`,
`archtree api --workers N`) on a free port with the given environment and waits until /healthz
answers; `api_env(redis_url, base)` is an environment with the private Redis, a temporary
artifact folder and small upload limits. `api_server` is one such API per test module. Use
with `pytest_plugins = ["tests.redis_fixtures", "tests.api_fixtures"]`.

PYTEST_DONT_REWRITE: no asserts here (see tests/redis_fixtures.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
API_START_S = 60.0
# Small, so that tests can exceed them cheaply; the builtin VGG's weights fit.
MAX_WEIGHTS_BYTES = 2_000_000
MAX_DATA_BYTES = 1_000_000
HEARTBEAT_TTL_S = 6.0

__all__ = ["ApiProcess", "api_env", "api_server", "free_port", "start_api"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class ApiProcess:
    """A running API: its URL, process and log."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    artifacts: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float | httpx.Timeout = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM by pid (uvicorn shuts down gracefully, its worker processes too), SIGKILL
        to the process group if it takes too long."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def api_env(redis_url: str, base: Path, **overrides: str) -> dict[str, str]:
    """An environment for the API (and the CLI) on `redis_url`, with files under `base`."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ARCHTREE_HOME": str(base / "home"),
        "ARCHTREE_REDIS_URL": redis_url,
        "ARCHTREE_ARTIFACTS_URL": str(base / "artifacts"),
        "ARCHTREE_WORK_DIR": str(base / "work"),
        "ARCHTREE_MAX_WEIGHTS_BYTES": str(MAX_WEIGHTS_BYTES),
        "ARCHTREE_MAX_DATA_BYTES": str(MAX_DATA_BYTES),
        "ARCHTREE_HEARTBEAT_TTL_S": str(HEARTBEAT_TTL_S),
        **overrides,
    }


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def start_api(
    env: dict[str, str], log_dir: Path, workers: int | None = None, port: int | None = None
) -> ApiProcess:
    """Start the API with `env` on `port` (default: a free one; as `archtree api --workers N`
    when `workers` is given); fail the test if it does not come up."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"api-{port}.log"
    command = [sys.executable, "-m", "uvicorn", "api.main:app"]
    if workers is not None:
        command = [sys.executable, "-m", "archtree_cli.main", "api", "--workers", str(workers)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group, so that a stuck one goes with its workers
        )
    api = ApiProcess(url, process, log_path, Path(env["ARCHTREE_ARTIFACTS_URL"]))
    deadline = time.monotonic() + API_START_S
    while not _healthy(url):
        if process.poll() is not None or time.monotonic() > deadline:
            api.stop()
            pytest.fail(f"the API did not start on port {port}:\n{api.output()[-3000:]}")
        time.sleep(0.1)
    return api


@pytest.fixture(scope="module")
def api_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    """An API on the private Redis with small upload limits; stopped at the module's end."""
    base = tmp_path_factory.mktemp("api")
    api = start_api(api_env(redis_url, base), base / "logs")
    try:
        yield api
    finally:
        api.stop()
