"""Redis restarted under a running job: a real redis-server with an append-only file (as the
compose file runs it), stopped and started again on the same port, real workers and agents."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from archtree_cli.client import ArchtreeClient
from tests.api_fixtures import api_env, start_api
from tests.redis_fixtures import _free_port, redis_server_executable, wait_until
from tests.test_workers import job_spec, start_agents, wait_for_end
from tests.worker_fixtures import WorkerPool
from workers.job_store import JobStore
from workers.tasks import submit_job

pytest_plugins = ["tests.redis_fixtures", "tests.worker_fixtures"]

OUTAGE_S = 5.0


class PersistentRedis:
    """A redis-server that keeps its data in an append-only file across restarts."""

    def __init__(self, directory: Path) -> None:
        executable = redis_server_executable()
        if executable is None:
            pytest.skip("redis-server is not on the PATH")
        self.command = [
            executable, "--port", str(_free_port()), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(directory),
        ]  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.command[2]}/0"
        self.log = directory / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, 30, "redis-server to answer")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def persistent_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path_factory.mktemp("persistent-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(persistent_redis: PersistentRedis) -> str:
    """This module's workers, agents and job store use the restartable server."""
    return persistent_redis.url


def test_a_job_and_its_followers_go_on_after_redis_restarts_under_it(
    persistent_redis: PersistentRedis, worker_pool: WorkerPool, agents, tmp_path: Path
):
    worker_pool.ensure(2)
    jobs = JobStore(redis.Redis.from_url(persistent_redis.url))
    api = start_api(
        api_env(
            persistent_redis.url,
            tmp_path,
            ARCHTREE_ARTIFACTS_URL=worker_pool.settings.artifacts_url,
        ),
        tmp_path / "logs",
    )
    start_agents(agents, jobs, "outage-cpu", 1)
    # Long fine-tunes: a child is surely running, asking Redis whether it was cancelled
    # every second, when Redis goes away.
    job_id = submit_job(jobs, job_spec("outage-cpu", ft_steps=300), celery=worker_pool.app)
    followed: list[tuple[str, dict]] = []
    retries: list[str] = []
    outcome: dict[str, BaseException] = {}

    def follow() -> None:
        try:
            with ArchtreeClient(api.url) as client:
                followed.extend(client.events(job_id, on_retry=retries.append))
        except BaseException as error:
            outcome["error"] = error

    follower = threading.Thread(target=follow, daemon=True)
    try:
        follower.start()

        def child_running() -> bool:
            return any(event["kind"] == "child_started" for _id, event in followed)

        wait_until(child_running, 120, "a child evaluation")
        persistent_redis.stop()
        time.sleep(OUTAGE_S)  # the outage itself: nothing to poll while Redis is down
        persistent_redis.start()

        job = wait_for_end(jobs, job_id, worker_pool, timeout_s=240)
        follower.join(60)
    finally:
        api.stop()
    assert job["status"] == "succeeded", f"{job['error']}\n{worker_pool.logs()}"
    assert any("Redis unreachable" in worker.output() for worker in worker_pool.workers)
    # The follower saw the whole job, each event once, to its final status.
    assert not follower.is_alive() and "error" not in outcome, outcome
    ids = [event_id for event_id, _ in followed]
    assert ids == sorted(set(ids), key=lambda i: tuple(map(int, i.split("-"))))
    assert (followed[-1][1]["kind"], followed[-1][1]["status"]) == ("status", "succeeded")


def test_the_first_requests_after_redis_restarts_are_served(
    persistent_redis: PersistentRedis, tmp_path: Path
):
    """Each pooled connection died with the old server; the first command on it must reconnect
    rather than answer 503 to a client that arrived after Redis came back."""
    api = start_api(api_env(persistent_redis.url, tmp_path), tmp_path / "logs")
    paths = ("/v1/jobs", "/v1/devices", "/readyz", "/v1/jobs/0123456789ab")
    try:
        with api.client() as client:
            before = {path: client.get(path).status_code for path in paths}
            persistent_redis.stop()
            persistent_redis.start()
            after = {path: client.get(path).status_code for path in paths}
    finally:
        api.stop()
    assert before == after, api.output()
    assert after["/v1/jobs"] == 200


def test_a_worker_holding_jobs_that_wait_for_their_device_survives_redis_restarting(
    persistent_redis: PersistentRedis, worker_pool: WorkerPool, agents
):
    """Jobs waiting for their device are countdown retries the worker holds unacknowledged.
    When Redis restarts, the worker reconnects (it used to die restoring them over the
    connection it had just closed), and the jobs go on once an agent of their class is on."""
    jobs = JobStore(redis.Redis.from_url(persistent_redis.url))
    with worker_pool.reconfigured(ARCHTREE_DEVICE_WAIT_S="120"):
        [worker] = worker_pool.ensure(1)
        waiting = [
            submit_job(jobs, job_spec("restart-cpu"), celery=worker_pool.app) for _ in range(2)
        ]

        def statuses() -> set[str]:
            return {jobs.get(job_id)["status"] for job_id in waiting}

        wait_until(lambda: statuses() == {"waiting_for_device"}, 60, "the jobs to wait")
        # kombu's record of the messages a worker holds: their retries, due in DEVICE_POLL_S.
        wait_until(lambda: jobs.client.hlen("unacked") == len(waiting), 30, "held retries")
        persistent_redis.stop()
        time.sleep(OUTAGE_S)
        persistent_redis.start()

        start_agents(agents, jobs, "restart-cpu", 1)
        wait_until(
            lambda: "waiting_for_device" not in statuses() or not worker.alive(),
            60,
            "the jobs to go on",
        )
        assert worker.alive(), worker.output()[-3000:]
        # At once, not after the visibility timeout: the retries were due in seconds.
        assert "back on their queue" in worker.output()
        job = wait_for_end(jobs, waiting[0], worker_pool, timeout_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{worker_pool.logs()}"


def test_a_redis_that_stalls_is_answered_503_without_waiting_for_it(
    persistent_redis: PersistentRedis, tmp_path: Path
):
    """A Redis that stops answering (stalled, not down: its port still takes connections) held
    every request for 30-70 s, each command waited out three times, and the dashboard showed
    its pages live meanwhile. Each path now answers 503 once one command has timed out."""
    import os
    import signal

    import httpx

    api = start_api(api_env(persistent_redis.url, tmp_path), tmp_path / "logs")
    paths = ("/v1/jobs", "/v1/devices", "/readyz", "/v1/jobs/0123456789ab")
    assert persistent_redis.process is not None
    pid = persistent_redis.process.pid
    try:
        # Far above the API's Redis timeout, far below what it used to take.
        with api.client(timeout=httpx.Timeout(12.0)) as client:
            assert client.get("/v1/jobs").status_code == 200
            os.kill(pid, signal.SIGSTOP)
            try:
                stalled = {path: client.get(path) for path in paths}
            finally:
                os.kill(pid, signal.SIGCONT)
            after = {path: client.get(path).status_code for path in paths}
    finally:
        api.stop()
    assert {path: answer.status_code for path, answer in stalled.items()} == dict.fromkeys(
        paths, 503
    ), api.output()
    assert "Redis" in stalled["/v1/jobs"].json()["detail"]
    assert after["/v1/jobs"] == 200 and after["/v1/devices"] == 200


def test_a_submission_to_a_stalled_broker_fails_in_seconds_and_one_after_a_restart_is_sent(
    persistent_redis: PersistentRedis, tmp_path: Path
):
    """Sending a job's first task to a Redis that stalls waited until it answered again: the
    API's submission held its request, and the job, already stored, stayed queued meanwhile.
    The API's Celery app now gives up after a timeout, once tried again, and the job fails
    saying to submit it again. The jobs are stored in another Redis here, which answers: only
    the send meets the stall."""
    import os
    import signal

    from kombu.exceptions import OperationalError

    from archtree_cli.settings import ServiceSettings
    from workers.celery_app import create_app

    store_redis = PersistentRedis(tmp_path)
    store_redis.start()
    try:
        store = JobStore(redis.Redis.from_url(store_redis.url))
        # A queue of its own: no worker of this module's other tests takes these jobs' tasks.
        settings = ServiceSettings(redis_url=persistent_redis.url, search_queue="stalls")
        celery = create_app(settings, publish_timeout_s=1.0)
        queued = submit_job(store, job_spec("nowhere"), celery=celery)  # connects the pool
        outcome: list[BaseException | str] = []

        def submit() -> None:
            try:
                outcome.append(submit_job(store, job_spec("nowhere"), celery=celery))
            except BaseException as error:  # noqa: BLE001 - handed to the test
                outcome.append(error)

        assert persistent_redis.process is not None
        os.kill(persistent_redis.process.pid, signal.SIGSTOP)
        try:
            sender = threading.Thread(target=submit, daemon=True)
            sender.start()
            sender.join(timeout=60)  # three timeouts of 1 s here
            waited = sender.is_alive()
        finally:
            os.kill(persistent_redis.process.pid, signal.SIGCONT)
        sender.join(timeout=60)
        assert not waited, "the send waited for the stalled Redis"
        assert isinstance(outcome[0], OperationalError), outcome
        jobs, _ = store.list(limit=5)
        failed = [job for job in jobs if job["id"] != queued]
        assert [job["status"] for job in failed] == ["failed"]
        assert failed[0]["error"].startswith(
            "the job could not be queued, Redis did not take it (Timeout reading from socket)"
        )
        # A restart leaves the pool's connections dead: the send reconnects and goes through.
        persistent_redis.stop()
        persistent_redis.start()
        sent = submit_job(store, job_spec("nowhere"), celery=celery)
        assert store.get(sent)["status"] == "queued"
    finally:
        store_redis.stop()


def test_a_task_redis_would_not_take_is_answered_503_not_500():
    """What a send to a broker that stalls or is down raises (kombu's OperationalError) is the
    service's Redis unable to serve, as a Redis command's timeout is: 503, try again."""
    import asyncio

    import httpx
    from fastapi import FastAPI
    from kombu.exceptions import OperationalError

    from api.error_handlers import add_error_handlers

    app = FastAPI()
    add_error_handlers(app)

    @app.post("/v1/jobs")
    def submit() -> None:
        raise OperationalError("Timeout reading from socket")

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await client.post("/v1/jobs")

    answer = asyncio.run(post())
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "5"
    assert answer.json()["detail"].startswith(
        "the service cannot reach its Redis (OperationalError); try again shortly"
    )
