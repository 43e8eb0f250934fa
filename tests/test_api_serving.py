"""How the API serves the paths clients poll: the async job reads agree with the job store, and
`archtree api --workers N` serves from N real processes over real HTTP, on a private Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
import redis.asyncio

from api.job_reads import read_job, read_jobs
from tests.api_fixtures import api_env, start_api
from tests.http_servers import serving
from tests.redis_fixtures import ROOT, wait_until
from workers.job_store import JobStore

pytest_plugins = ["tests.redis_fixtures", "tests.api_fixtures"]

# A job's spec as the API stores it (api.schemas.JobSpec).
SPEC = {
    "model": "builtin:vgg",
    "data": "builtin:digits",
    "budget": "60%",
    "device_class": "local",
    "search": {"width": 2},
}
STARTUP_LINE = re.compile(r"Started server process \[(\d+)\]")


def make_jobs(store: JobStore) -> list[str]:
    """Jobs in several states: queued, running with progress, failed, cancel requested."""
    queued = store.create(SPEC)
    running = store.create({**SPEC, "budget": "8ms"})
    store.set_status(running, "running")
    store.update_progress(
        running, depth=2, best={"id": "n4", "latency_ms": 0.41, "score": 0.9}, budget_ms=0.5
    )
    failed = store.create(SPEC)
    store.set_status(failed, "failed", error="no agent of class local came online")
    cancelled = store.create(SPEC)
    store.request_cancel(cancelled)
    return [queued, running, failed, cancelled]


def read_async(redis_url: str, store: JobStore, call: Any, *args: Any) -> Any:
    """`call(client, store, *args)` with a redis.asyncio client, in an event loop of its own."""

    async def go() -> Any:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            return await call(client, store, *args)
        finally:
            await client.aclose()

    return asyncio.run(go())


def test_async_reads_return_what_the_job_store_returns(redis_client: redis.Redis, redis_url: str):
    store = JobStore(redis_client)
    ids = make_jobs(store)

    for job_id in ids:
        assert read_async(redis_url, store, read_job, job_id) == store.get(job_id)
    assert read_async(redis_url, store, read_job, "nosuchjob") is None
    for offset, limit in [(0, 20), (1, 2), (3, 5), (10, 5)]:
        assert read_async(redis_url, store, read_jobs, offset, limit) == store.list(offset, limit)
    everything, _ = store.list(0, 100)
    for statuses in (["queued"], ["failed", "running"], ["succeeded"]):
        kept = [job for job in everything if job["status"] in statuses]
        assert read_async(redis_url, store, read_jobs, 0, 20, statuses) == (kept, len(kept))
        assert read_async(redis_url, store, read_jobs, 1, 1, statuses) == (kept[1:2], len(kept))


def test_jobs_are_counted_by_status(redis_client: redis.Redis):
    store = JobStore(redis_client)
    make_jobs(store)
    store.set_status(store.create(SPEC), "succeeded")
    everything, _ = store.list(0, 100)

    counts = store.counts_by_status()

    assert set(counts) >= {"queued", "running", "succeeded", "failed", "cancelled"}
    for status, count in counts.items():
        assert count == sum(job["status"] == status for job in everything), status
    assert counts["queued"] == counts["succeeded"] == counts["failed"] == 1


def test_archtree_api_with_two_workers_serves_then_stops_both(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path
):
    store = JobStore(redis_client)
    job_id = make_jobs(store)[1]
    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs", workers=2)
    try:
        servers = wait_until(
            lambda: (pids := STARTUP_LINE.findall(api.output())) and len(pids) == 2 and pids,
            30,
            "two API worker processes",
        )
        children = {child.pid for child in psutil.Process(api.process.pid).children()}
        assert {int(pid) for pid in servers} <= children

        def poll(_: int) -> tuple[int, dict[str, Any]]:
            # A connection each, so that both processes take some of them.
            answer = httpx.get(f"{api.url}/v1/jobs/{job_id}", timeout=30)
            return answer.status_code, answer.json()

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(poll, range(40)))
        assert {status for status, _ in answers} == {200}
        job = answers[0][1]
        assert all(body == job for _, body in answers)
        assert job["status"] == "running" and job["progress"]["best"]["id"] == "n4"
        assert job["links"]["job"] == f"/v1/jobs/{job_id}"
        missing = httpx.get(f"{api.url}/v1/jobs/nosuchjob")
        assert missing.status_code == 404 and "no job 'nosuchjob'" in missing.json()["detail"]
        listed = httpx.get(f"{api.url}/v1/jobs", params={"limit": 2}).json()
        assert listed["total"] == 4 and len(listed["jobs"]) == 2
    finally:
        api.stop()
    assert api.process.returncode == 0, api.output()[-3000:]
    for pid in servers:
        assert not psutil.pid_exists(int(pid)), f"API worker {pid} outlived its parent"


def test_archtree_api_refuses_zero_workers_in_one_line(redis_url: str, tmp_path: Path):
    # ARCHTREE_API_WORKERS=0 is a bad setting, refused as any other (the test below).
    command = [sys.executable, "-m", "archtree_cli.main", "api", "--port", "1", "--workers", "0"]
    finished = subprocess.run(
        command,
        cwd=ROOT,
        env=api_env(redis_url, tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2
    assert finished.stderr.startswith("archtree: error: --workers must be from 1 to 64, not 0: ")
    assert len(finished.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("command", "variable", "value", "expected"),
    [
        ("api", "ARCHTREE_MAX_DATA_BYTES", "lots", "should be a valid integer"),
        ("worker", "ARCHTREE_DEVICE_WAIT_S", "soon", "should be a valid number"),
        ("api", "ARCHTREE_ALLOWED_MODULES", "[mypkg", "separated by commas (a,b) or as a JSON"),
        ("worker", "ARCHTREE_REDIS_URL", "notaurl", "is not a Redis URL: give one like redis://"),
        ("api", "ARCHTREE_MAX_WEIGHTS_BYTES", "-1", "should be greater than 0"),
        ("worker", "ARCHTREE_HEARTBEAT_TTL_S", "nan", "should be a finite number"),
        ("api", "ARCHTREE_API_WORKERS", "0", "should be greater than or equal to 1"),
        ("worker", "ARCHTREE_REDIS_URL", "redis://127.0.0.1:6379/abc", "names database 'abc'"),
        ("worker", "ARCHTREE_SEARCH_QUEUE", " ", "give a queue name, or leave the variable"),
        ("api", "ARCHTREE_ALLOWED_MODULES", "good,bad-name", "'bad-name' is not a Python package"),
        ("api", "ARCHTREE_ALLOWED_MODULES", '["a", 1]', "a JSON list of package names, each a"),
        ("worker", "ARCHTREE_REDIS_URL", " redis://127.0.0.1:6379/0", "has spaces around it"),
        ("api", "ARCHTREE_AGENT_REDIS_URL", "http://not-redis", "is not a Redis URL"),
        # Read as the folder each process starts in: jobs' files scattered, or apart.
        ("worker", "ARCHTREE_ARTIFACTS_URL", "", "give a folder (or URL), or leave the variable"),
        ("worker", "ARCHTREE_WORK_DIR", " ", "give it without spaces around it"),
        ("worker", "ARCHTREE_SEARCH_QUEUE", "a,b", "a queue name is letters, digits"),
        # Thousands of API processes, each ~300 MB, exhaust the machine.
        ("api", "ARCHTREE_API_WORKERS", "5000", "should be less than or equal to 64"),
        ("worker", "ARCHTREE_DEVICE_WAIT_S", "1e300", "should be less than or equal to"),
        ("worker", "ARCHTREE_TASK_LEASE_S", "0.001", "should be greater than or equal to 1"),
    ],
)
def test_a_bad_setting_in_the_environment_is_one_line_naming_it(
    command: str, variable: str, value: str, expected: str, redis_url: str, tmp_path: Path
):
    finished = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", command],
        cwd=ROOT,
        env={**api_env(redis_url, tmp_path), variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.startswith(
        f"archtree: error: bad setting in the environment: {variable}={value!r}: "
    )
    assert expected in finished.stderr and len(finished.stderr.splitlines()) == 1


class _NotRedis(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("command", ["api", "worker"])
def test_a_redis_that_answers_but_can_never_serve_is_refused_at_start(
    command: str, redis_url: str, tmp_path: Path
):
    """A database out of range, or something that is not Redis at the address: one line at
    start, not a traceback on every request or task; a Redis not started yet is waited for."""

    def started(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "archtree_cli.main", command, "--port", "1"]
            if command == "api"
            else [sys.executable, "-m", "archtree_cli.main", command],
            cwd=ROOT,
            env=api_env(url, tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )

    out_of_range = started(redis_url.rsplit("/", 1)[0] + "/99")
    assert out_of_range.returncode == 2, out_of_range.stderr
    assert out_of_range.stderr.endswith(
        f"(ARCHTREE_REDIS_URL) refuses the {'API' if command == 'api' else 'worker'}: DB index "
        "is out of range\n"
    ), out_of_range.stderr
    with serving(_NotRedis) as http_url:
        port = http_url.rsplit(":", 1)[1]
        not_redis = started(f"redis://127.0.0.1:{port}/0")
    assert not_redis.returncode == 2, not_redis.stderr
    assert f"redis://127.0.0.1:{port}/0 (ARCHTREE_REDIS_URL) answers, but not as Redis" in (
        not_redis.stderr
    )
    assert not_redis.stderr.endswith("check its host and port\n")


def test_a_visibility_timeout_not_above_the_task_lease_is_refused(redis_url: str, tmp_path: Path):
    """Else a task still running is handed to a second worker before its lease is seen lost."""
    finished = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", "worker"],
        cwd=ROOT,
        env={**api_env(redis_url, tmp_path), "ARCHTREE_VISIBILITY_TIMEOUT_S": "5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.startswith(
        "archtree: error: bad setting in the environment: ARCHTREE_TASK_LEASE_S="
    )
    assert "the task lease must be below ARCHTREE_VISIBILITY_TIMEOUT_S (5 s)" in finished.stderr


@pytest.mark.parametrize(
    ("command", "environment", "expected"),
    [
        (["api"], {"ARCHTREE_ARTIFACTS_URL": "/proc/archtree"}, "cannot use '/proc/archtree' as"),
        (["worker", "--queues", "evalute"], {}, "--queues: no queue 'evalute'"),
        (["worker", "--queues", " , "], {}, "--queues names no queue: give search, evaluate"),
        (["worker", "--name", "a b@@%q"], {}, "--name 'a b@@%q' is not a worker name"),
        (["api", "--workers", "5000"], {}, "--workers must be from 1 to 64, not 5000: "),
        # A worker that could take tasks but fail every one leaves their jobs stuck: refused.
        (["worker"], {"ARCHTREE_ARTIFACTS_URL": "/proc/archtree"}, "cannot use '/proc/archtree'"),
        (
            ["worker"],
            {"ARCHTREE_WORK_DIR": "/proc/version/work"},
            "cannot write to ARCHTREE_WORK_DIR /proc/version/work: /proc/version is a file",
        ),
    ],
)
def test_an_unusable_artifact_store_or_queue_is_one_line(
    command: list[str], environment: dict[str, str], expected: str, redis_url: str, tmp_path: Path
):
    finished = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", *command],
        cwd=ROOT,
        env={**api_env(redis_url, tmp_path), **environment},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.startswith(f"archtree: error: {expected}"), finished.stderr
    assert len(finished.stderr.splitlines()) == 1


@pytest.mark.parametrize("value", ["mypkg, other", '["mypkg", "other"]'])
def test_allowed_modules_are_read_comma_separated_or_as_json(
    value: str, monkeypatch: pytest.MonkeyPatch
):
    from archtree_cli.settings import load_service_settings

    monkeypatch.setenv("ARCHTREE_ALLOWED_MODULES", value)
    assert load_service_settings().allowed_modules == ["mypkg", "other"]


def test_archtree_api_stops_its_workers_on_sigint(redis_url: str, tmp_path: Path):
    """Ctrl-C in a terminal reaches the whole group; the workers end with the parent."""
    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs", workers=2)
    servers = wait_until(
        lambda: (pids := STARTUP_LINE.findall(api.output())) and len(pids) == 2 and pids,
        30,
        "two API worker processes",
    )
    os.killpg(api.process.pid, signal.SIGINT)
    try:
        api.process.wait(timeout=20)
    finally:
        api.stop()
    for pid in servers:
        assert not psutil.pid_exists(int(pid)), f"API worker {pid} outlived its parent"


def test_archtree_api_on_a_taken_port_says_so_in_one_line(redis_url: str, tmp_path: Path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "-m", "archtree_cli.main", "api", "--port", str(port)],
            cwd=ROOT,
            env=api_env(redis_url, tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert finished.returncode == 2, finished.stderr
    assert finished.stderr.startswith(f"archtree: error: port {port} on 127.0.0.1 is taken ")
    assert finished.stderr.endswith(
        "stop what serves there (another `archtree up` or API?), or give --port\n"
    )
    assert len(finished.stderr.splitlines()) == 1


def test_archtree_api_killed_takes_its_workers_with_it(redis_url: str, tmp_path: Path):
    """Killed outright (SIGKILL, the OOM killer), it cannot stop them: they die with it, not
    go on serving and holding the port."""
    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs", workers=2)
    servers = wait_until(
        lambda: (pids := STARTUP_LINE.findall(api.output())) and len(pids) == 2 and pids,
        30,
        "two API worker processes",
    )
    api.process.kill()
    try:
        api.process.wait(timeout=20)
        wait_until(
            lambda: not any(psutil.pid_exists(int(pid)) for pid in servers), 20, "workers gone"
        )
    finally:
        api.stop()


def test_api_startup_freezes_what_it_imported_so_full_collections_skip_it(redis_url: str):
    """Without the freeze, every full collection walks torch's objects: a pause for every
    request in flight (bench/service_overhead.py measures the polling latency it costs)."""
    import gc

    from fastapi.testclient import TestClient

    from api.main import create_app
    from archtree_cli.settings import ServiceSettings

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        with TestClient(create_app(ServiceSettings(redis_url=redis_url))) as client:
            assert client.get("/healthz").status_code == 200
            frozen = gc.get_freeze_count()
            assert frozen > 100_000, f"only {frozen} objects frozen"
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("workers", [1, 2])
def test_archtree_api_ends_open_event_streams_at_once_on_sigterm(
    redis_url: str, tmp_path: Path, workers: int
):
    """A client following a quiet job keeps its stream open; SIGTERM ends the stream (its
    client resumes it on the next API) well before the API's graceful-shutdown timeout would
    cut it, and the API exits without an error or a traceback in its log, in each of its
    worker processes."""
    from archtree_cli.service_commands import API_STOP_GRACE_S

    api = start_api(api_env(redis_url, tmp_path), tmp_path / "logs", workers=workers)
    try:
        spec = {"model": "builtin:vgg", "data": "builtin:digits", "budget": "60%"}
        with api.client() as client:
            answer = client.post("/v1/jobs", data={"spec": json.dumps(spec)})
        assert answer.status_code == 202, answer.text
        job_id = answer.json()["id"]
        opened = threading.Event()
        outcome: dict[str, Any] = {}

        def follow() -> None:
            with (
                httpx.Client(base_url=api.url, timeout=120) as client,
                client.stream("GET", f"/v1/jobs/{job_id}/events") as stream,
            ):
                try:
                    for _ in stream.iter_raw():
                        opened.set()  # its first event came: the stream is under way
                    outcome["ended"] = time.monotonic()
                except httpx.RemoteProtocolError as error:  # cut mid-stream
                    outcome["cut"] = error

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert opened.wait(30), "the event stream did not open"
        started = time.monotonic()
        os.kill(api.process.pid, signal.SIGTERM)
        api.process.wait(timeout=30)
        follower.join(10)
        assert not follower.is_alive(), "the stream stayed open after the API stopped"
        output = api.output()
        for error in ("timeout graceful shutdown exceeded", "Exception in ASGI", "Traceback"):
            assert error not in output, output[-3000:]
        assert "ended" in outcome, outcome
        took_s = outcome["ended"] - started
        assert took_s < API_STOP_GRACE_S, f"the stream ended {took_s:.1f} s after SIGTERM"
    finally:
        api.stop()
        redis.Redis.from_url(redis_url).flushdb()
