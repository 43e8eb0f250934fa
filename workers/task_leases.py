"""Leases on a job's running tasks, so that a task whose worker died is seen at once.

Celery hands the task of a worker killed outright (SIGKILL, a lost machine) to another worker
only once the broker's visibility timeout has passed, minutes later; until then the job looks
as if it were running. While a task runs, its worker renews a short lease in Redis; a task
whose lease has expired is lost, and readers of the job (the API) can say so, and by when
another worker takes it.

Keys, beside the job's own: `{prefix}job:{id}:tasks`, a hash of the running tasks by Celery
task id (name, worker, start time), and `{prefix}job:{id}:lease:{task id}`, which expires
`lease_s` after the last renewal.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import redis

from archtree_cli.settings import ServiceSettings
from workers.celery_app import redelivery_s
from workers.job_store import REDIS_UNREACHABLE, JobStore

log = logging.getLogger(__name__)

# A lease is renewed this many times within its length: one late renewal does not lose it.
RENEWALS_PER_LEASE = 3
# How long the mark that a lost task was announced is kept: longer than any redelivery.
ANNOUNCED_KEPT_S = 7 * 24 * 3600
# The tasks of a job's hash (KEYS[1]) whose lease key (ARGV[1] and the task id) is gone, as
# task id, record, ...
LOST_TASKS_SCRIPT = """
local running = redis.call('HGETALL', KEYS[1])
local unleased = {}
for i = 1, #running, 2 do
    if redis.call('EXISTS', ARGV[1] .. running[i]) == 0 then
        table.insert(unleased, running[i])
        table.insert(unleased, running[i + 1])
    end
end
return unleased
"""


@dataclass(frozen=True)
class LostTask:
    """A task whose worker stopped renewing its lease."""

    task_id: str
    name: str
    worker: str
    started_at: float
    silent_s: float  # since the worker last renewed the lease (at least the lease's length)
    back_by: float  # Unix time by which the broker hands the task to another worker

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TaskLeases:
    """One Redis connection's view of the leases on jobs' running tasks. `redelivery_s` is how
    long after its start the broker hands a task that was not acknowledged to another worker
    (the visibility timeout, and the interval at which expired tasks are looked for)."""

    def __init__(
        self, client: redis.Redis, lease_s: float, redelivery_s: float, prefix: str = "archtree:"
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.redelivery_s = redelivery_s
        self.prefix = prefix

    @classmethod
    def of(cls, client: redis.Redis, settings: ServiceSettings) -> TaskLeases:
        """The leases as the service's settings make them."""
        return cls(client, settings.task_lease_s, redelivery_s(settings))

    def tasks_key(self, job_id: str) -> str:
        """The hash of the job's running tasks (async readers in the API read it directly)."""
        return f"{self.prefix}job:{job_id}:tasks"

    def lease_key(self, job_id: str, task_id: str) -> str:
        return f"{self.prefix}job:{job_id}:lease:{task_id}"

    def _announced_key(self, job_id: str, task_id: str, started_at: float) -> str:
        return f"{self.prefix}job:{job_id}:lost:{task_id}:{started_at!r}"

    @contextmanager
    def hold(self, job_id: str, task_id: str, name: str, worker: str) -> Iterator[None]:
        """Hold the lease of the job's task `task_id` while the block runs; renewed by a
        thread, so that a long fine-tune or measurement keeps it. A Redis outage does not fail
        the block: the job step deals with it, and the lease is taken again once Redis
        answers."""
        record = {"name": name, "worker": worker, "started_at": time.time()}
        with suppress(REDIS_UNREACHABLE):  # the renewing thread takes it once Redis answers
            self._renew(job_id, task_id, record)
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._keep_renewing,
            args=(job_id, task_id, record, stop),
            name=f"lease-{task_id}",
            daemon=True,
        )
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            try:
                pipe = self.client.pipeline(transaction=True)
                pipe.hdel(self.tasks_key(job_id), task_id)
                pipe.delete(self.lease_key(job_id, task_id))
                pipe.execute()
            except REDIS_UNREACHABLE as error:
                # The lease expires by itself; the task's record stays until a later run of it.
                log.warning("job %s: task %s's lease not released (%s)", job_id, task_id, error)

    def _renew(self, job_id: str, task_id: str, record: dict[str, Any]) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.tasks_key(job_id), task_id, json.dumps({**record, "renewed_at": now}))
        pipe.set(self.lease_key(job_id, task_id), b"1", px=max(1, int(self.lease_s * 1000)))
        pipe.execute()

    def _keep_renewing(
        self, job_id: str, task_id: str, record: dict[str, Any], stop: threading.Event
    ) -> None:
        while not stop.wait(self.lease_s / RENEWALS_PER_LEASE):
            try:
                self._renew(job_id, task_id, record)
            except REDIS_UNREACHABLE:
                continue  # asked again at the next renewal

    def lost_query(self, job_id: str) -> tuple[str, int, str, str]:
        """The arguments of `client.eval` that reads the job's tasks without a lease, as a flat
        list of task ids and records: the hash and the leases read at once, so that a task
        ending between two reads (its record and lease deleted together) is not taken for
        lost. Async readers in the API send it on their own connection."""
        return LOST_TASKS_SCRIPT, 1, self.tasks_key(job_id), self.lease_key(job_id, "")

    def lost(self, job_id: str) -> list[LostTask]:
        """The job's tasks whose lease has expired, oldest first."""
        return self.lost_among(self.client.eval(*self.lost_query(job_id)))

    def lost_among(self, unleased: list[bytes]) -> list[LostTask]:
        """The tasks `lost_query` read (task id, record, ...), oldest first."""
        now = time.time()
        lost = []
        for raw_id, raw_record in zip(unleased[::2], unleased[1::2], strict=True):
            record = json.loads(raw_record)
            lost.append(
                LostTask(
                    task_id=raw_id.decode(),
                    name=record["name"],
                    worker=record["worker"],
                    started_at=record["started_at"],
                    silent_s=max(self.lease_s, now - record["renewed_at"]),
                    back_by=record["started_at"] + self.redelivery_s,
                )
            )
        return sorted(lost, key=lambda task: task.started_at)

    def announce_lost(self, jobs: JobStore, job_id: str) -> list[LostTask]:
        """The job's lost tasks; each is said once in the job's events (`task_lost`), by
        whichever reader of the job sees it first."""
        lost = self.lost(job_id)
        for task in lost:
            key = self._announced_key(job_id, task.task_id, task.started_at)
            if self.client.set(key, b"1", nx=True, ex=ANNOUNCED_KEPT_S):
                jobs.append_event(job_id, "task_lost", task.to_dict())
        return lost
