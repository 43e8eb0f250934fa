"""Real Celery worker processes for tests, on the private Redis of tests.redis_fixtures.

`worker_pool` (one per test module) starts workers with
`python -m celery -A workers.celery_app worker -Q search,evaluate -c 1 -n wN@%h`, configured
by ARCHTREE_* variables: the private Redis, a temporary artifact folder, a short visibility
timeout (so the tasks of a killed worker come back quickly), a short task lease (so they are
seen lost at once) and a short device wait. Use with
`pytest_plugins = ["tests.redis_fixtures", "tests.worker_fixtures"]`.

PYTEST_DONT_REWRITE: no asserts here (see tests/redis_fixtures.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from archtree_cli.settings import ServiceSettings
from workers.celery_app import EVALUATE_CHILD, create_app
from workers.job_store import FINAL_STATUSES, JobStore
from workers.task_leases import TaskLeases

ROOT = Path(__file__).resolve().parents[1]
WORKER_START_S = 60.0
# Tasks here take a few seconds: a task still unacknowledged after this long belonged to a
# worker that died, and goes to another one.
VISIBILITY_TIMEOUT_S = 12.0
# Short, so that a killed worker's task is shown lost well before it goes to another worker;
# long enough that a live worker's renewals (every third of it) are not all missed on a
# loaded 2-core machine.
TASK_LEASE_S = 5.0
DEVICE_WAIT_S = 4.0
# How long a job may take to have a child running, for a test that kills its worker then.
CHILD_RUNNING_S = 180.0

__all__ = ["WorkerPool", "WorkerProcess", "worker_pool"]


@dataclass
class WorkerProcess:
    """One Celery worker (its main process leads a process group with its pool child)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL to the worker and its pool child: the machine is gone, nothing is acked."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Celery's warm shutdown (SIGTERM), then SIGKILL if it takes longer than `timeout_s`."""
        if self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process.wait()


@dataclass
class WorkerPool:
    """Starts, kills and stops worker processes of one test module."""

    settings: ServiceSettings
    app: Celery
    env: dict[str, str]
    log_dir: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def api_settings(self) -> dict[str, str]:
        """What an API beside these workers must share with them, as ARCHTREE_* variables:
        their artifact store, and the task lease and visibility timeout it reports with."""
        return {
            "ARCHTREE_ARTIFACTS_URL": self.settings.artifacts_url,
            "ARCHTREE_TASK_LEASE_S": str(self.settings.task_lease_s),
            "ARCHTREE_VISIBILITY_TIMEOUT_S": str(self.settings.visibility_timeout_s),
        }

    def alive(self) -> list[WorkerProcess]:
        return [worker for worker in self.workers if worker.alive()]

    def start(self, count: int = 1) -> list[WorkerProcess]:
        """Start `count` workers and wait until each answers a ping."""
        started = [self._spawn(len(self.workers) + 1 + i) for i in range(count)]
        self.workers.extend(started)
        self._wait_answering(started)
        return started

    def start_as(self, worker: WorkerProcess) -> WorkerProcess:
        """Start a worker under the name of `worker` (which is dead), as a service manager
        starts one again, and wait until it answers a ping."""
        number = int(worker.name[1 : worker.name.index("@")])
        again = self._spawn(number, log_name=f"worker-{number}-{len(self.workers) + 1}.log")
        self.workers.append(again)
        self._wait_answering([again])
        return again

    def _wait_answering(self, started: list[WorkerProcess]) -> None:
        deadline = time.monotonic() + WORKER_START_S
        waiting = {worker.name for worker in started}
        while waiting:
            for worker in started:
                if not worker.alive():
                    pytest.fail(f"worker {worker.name} exited:\n{worker.output()[-3000:]}")
            try:
                replies = self.app.control.ping(destination=sorted(waiting), timeout=0.5)
            except (OSError, redis.RedisError):  # a connection pooled before Redis restarted
                replies = []
            waiting -= {name for reply in replies for name in reply}
            if waiting and time.monotonic() > deadline:
                pytest.fail(f"workers {sorted(waiting)} did not answer within {WORKER_START_S} s")

    def ensure(self, count: int) -> list[WorkerProcess]:
        """Exactly `count` live workers (more are stopped, missing ones started)."""
        alive = self.alive()
        for worker in alive[count:]:
            worker.stop()
        if len(alive) < count:
            self.start(count - len(alive))
        return self.alive()

    @contextmanager
    def reconfigured(self, **env: str) -> Iterator[None]:
        """Workers started inside run with `env` added (ARCHTREE_* settings); those running
        are stopped on entry, and those started inside are stopped on exit."""
        self.ensure(0)
        saved = dict(self.env)
        self.env.update(env)
        try:
            yield
        finally:
            self.ensure(0)
            self.env.clear()
            self.env.update(saved)

    def kill_one_running_a_child(self, job_id: str) -> tuple[WorkerProcess, dict[str, Any]]:
        """Kill a worker while it runs one of the job's children, and return it with the
        child's `child_started` event: the worker has said it started the child, and the
        child's lease record is still there once the worker is dead. A child can end within a
        fraction of a second of starting, leaving a worker killed just after it nothing to
        lose: then another worker takes the dead one's place, and it tries again. Fails when
        the job ends first."""
        client = redis.Redis.from_url(self.settings.redis_url)
        jobs = JobStore(client)
        tasks_key = TaskLeases.of(client, self.settings).tasks_key(job_id)
        deadline = time.monotonic() + CHILD_RUNNING_S
        with client:
            while time.monotonic() < deadline:
                job = jobs.get(job_id) or {}
                if job.get("status") in FINAL_STATUSES:
                    pytest.fail(f"job {job_id} ended ({job['status']}) before a worker was killed")
                running = _children_running(jobs, tasks_key, job_id, self.alive())
                if not running:
                    time.sleep(0.05)
                    continue
                task_id, victim, started = running[0]
                victim.kill()
                if client.hexists(tasks_key, task_id):
                    return victim, started
                self.start(1)
        pytest.fail(f"no worker ran a child of job {job_id} within {CHILD_RUNNING_S} s")

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.output()[-4000:]}" for w in self.workers)

    def _spawn(self, number: int, log_name: str | None = None) -> WorkerProcess:
        name = f"w{number}@{socket.gethostname()}"
        log_path = self.log_dir / (log_name or f"worker-{number}.log")
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            f"{self.settings.search_queue},{self.settings.evaluate_queue}",
            "-c",
            "1",
            "-n",
            f"w{number}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return WorkerProcess(name, process, log_path)


def _children_running(
    jobs: JobStore, tasks_key: str, job_id: str, alive: list[WorkerProcess]
) -> list[tuple[bytes, WorkerProcess, dict[str, Any]]]:
    """(task id, worker, its `child_started` event) of each child a live worker holds the
    lease of and has said it started (since it took the lease)."""
    workers = {worker.name: worker for worker in alive}
    running = []
    for task_id, raw in jobs.client.hgetall(tasks_key).items():
        record = json.loads(raw)
        if record["name"] != EVALUATE_CHILD or record["worker"] not in workers:
            continue
        since = f"{int(record['started_at'] * 1000) - 1}-0"  # a stream id: ms since the epoch
        said = [
            event
            for _, event in jobs.read_events(job_id, after=since)
            if event["kind"] == "child_started" and event.get("worker") == record["worker"]
        ]
        if said:
            running.append((task_id, workers[record["worker"]], said[-1]))
    return running


@pytest.fixture(scope="module")
def worker_pool(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """A pool of worker processes on the private Redis; all are stopped at the module's end."""
    base = tmp_path_factory.mktemp("workers")
    settings = ServiceSettings(
        redis_url=redis_url,
        artifacts_url=str(base / "artifacts"),
        work_dir=base / "work",
        visibility_timeout_s=VISIBILITY_TIMEOUT_S,
        device_wait_s=DEVICE_WAIT_S,
        task_lease_s=TASK_LEASE_S,
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ARCHTREE_HOME": str(base / "home"),
        "ARCHTREE_REDIS_URL": redis_url,
        "ARCHTREE_ARTIFACTS_URL": settings.artifacts_url,
        "ARCHTREE_WORK_DIR": str(settings.work_dir),
        "ARCHTREE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "ARCHTREE_DEVICE_WAIT_S": str(DEVICE_WAIT_S),
        "ARCHTREE_TASK_LEASE_S": str(TASK_LEASE_S),
    }
    (base / "logs").mkdir()
    pool = WorkerPool(settings, create_app(settings), env, base / "logs")
    try:
        yield pool
    finally:
        pool.stop_all()
        pool.app.close()
