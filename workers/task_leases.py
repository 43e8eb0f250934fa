"""Leases on a job's running tasks, so that a task whose worker died is seen at once.

Celery hands the task of a worker killed outright (SIGKILL, a lost machine) to another worker
only once the broker's visibility timeout has passed, minutes later; until then the job looks
as if it were running. While a task runs, its worker renews a short lease in Redis; a task
whose lease has expired is lost, and readers of the job (the API) can say so, and by when
another worker takes it.

Nor does the task wait for the visibility timeout: the live workers look for lost tasks
(`redeliver_lost`, workers/lost_task_sweeper.py), and a task still lost a whole lease after
one of them first saw it so has its message marked as expired in kombu's index of the
messages handed out, so that kombu's next look for expired messages (every few seconds, in
any worker) puts it back on its queue. The second look is what tells a dead worker from one
that a Redis outage kept from renewing: that one renews again within a third of a lease once
Redis answers.

Keys, beside the job's own: `{prefix}job:{id}:tasks`, a hash of the running tasks by Celery
task id (name, worker, start time), `{prefix}job:{id}:lease:{task id}`, which expires
`lease_s` after the last renewal, `{prefix}running_tasks`, the running tasks of every job
(task id -> job id), and `{prefix}job:{id}:lost_since:{task id}`, when a sweep first saw the
task lost.
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
from workers.celery_app import redelivery_s, restore_interval_s
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
# Lua functions both sweeps use (this one and workers/task_holders.py's): the server's time;
# the Celery task id of a message in kombu's hash of unacknowledged ones (its headers' id), or
# false; and whether a task a sweep sees without what keeps it (a lease, a live worker) has
# been so a whole lease since the first sweep that saw it so, which marks when (in `mark`):
# that time when it has, false when not.
SWEEP_FUNCTIONS = """
local function server_now()
    local clock = redis.call('TIME')
    return tonumber(clock[1]) + tonumber(clock[2]) / 1000000
end
local function task_of(stored)
    local ok, message = pcall(cjson.decode, stored)
    local headers = ok and type(message) == 'table' and type(message[1]) == 'table'
        and message[1]['headers']
    return type(headers) == 'table' and headers['id']
end
local function lost_for_a_lease(mark, now, lease_s)
    local since = redis.call('GET', mark)
    if not since then
        redis.call('SET', mark, tostring(now), 'PX', math.floor(lease_s * 10000))
        return false
    end
    since = tonumber(since)
    return now - since >= lease_s and since
end
"""
# Of the running tasks (KEYS[1], task id -> job id), those whose lease is gone: the first
# sweep to see one so marks when; one a whole lease (ARGV[2]) later, still lost, has its
# message (in kombu's hash of unacknowledged messages, KEYS[2], the one whose Celery headers
# carry its id) marked as handed out at time 0 in kombu's index of them (KEYS[3]), if it is
# still there, and leaves the running tasks. A task whose lease is back loses its mark.
# Returns the ids of the tasks handed back. ARGV[1]: the key prefix.
REDELIVER_LOST_SCRIPT = (
    SWEEP_FUNCTIONS
    + """
local now = server_now()
local lease_s = tonumber(ARGV[2])
local running = redis.call('HGETALL', KEYS[1])
local lost = {}
for i = 1, #running, 2 do
    local task, job = running[i], ARGV[1] .. 'job:' .. running[i + 1]
    local mark = job .. ':lost_since:' .. task
    if redis.call('EXISTS', job .. ':lease:' .. task) == 1 then
        redis.call('DEL', mark)
    elseif lost_for_a_lease(mark, now, lease_s) then
        lost[task] = true
        redis.call('HDEL', KEYS[1], task)
        redis.call('DEL', mark)
    end
end
local handed_back = {}
if next(lost) == nil then
    return handed_back
end
local unacked = redis.call('HGETALL', KEYS[2])
for i = 1, #unacked, 2 do
    local task = task_of(unacked[i + 1])
    if task and lost[task] and redis.call('ZSCORE', KEYS[3], unacked[i]) then
        redis.call('ZADD', KEYS[3], 'XX', 0, unacked[i])
        table.insert(handed_back, task)
    end
end
return handed_back
"""
)
# kombu's hash of the messages handed out and not acknowledged, by delivery tag, and its
# sorted set of them by when (its Redis transport's `unacked_key` and `unacked_index_key`,
# with no global key prefix).
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


@dataclass(frozen=True)
class LostTask:
    """A task whose worker stopped renewing its lease."""

    task_id: str
    name: str
    worker: str
    started_at: float
    silent_s: float  # since the worker last renewed the lease (at least the lease's length)
    back_by: float  # Unix time by which another worker takes the task, if one is alive

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TaskLeases:
    """One Redis connection's view of the leases on jobs' running tasks. `redelivery_s` is how
    long after its start the broker hands a task that was not acknowledged to another worker
    (the visibility timeout, and the interval at which expired tasks are looked for);
    `restore_s`, that interval alone."""

    def __init__(
        self,
        client: redis.Redis,
        lease_s: float,
        redelivery_s: float,
        prefix: str = "archtree:",
        restore_s: float = 10.0,
    ) -> None:
        self.client = client
        self.lease_s = lease_s
        self.redelivery_s = redelivery_s
        self.prefix = prefix
        self.restore_s = restore_s

    @classmethod
    def of(cls, client: redis.Redis, settings: ServiceSettings) -> TaskLeases:
        """The leases as the service's settings make them."""
        return cls(
            client,
            settings.task_lease_s,
            redelivery_s(settings),
            restore_s=restore_interval_s(settings.visibility_timeout_s),
        )

    @property
    def sweep_every_s(self) -> float:
        """How often the live workers look for lost tasks (`redeliver_lost`)."""
        return self.lease_s / RENEWALS_PER_LEASE

    @property
    def running_key(self) -> str:
        return f"{self.prefix}running_tasks"

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
                pipe.hdel(self.running_key, task_id)
                pipe.execute()
            except REDIS_UNREACHABLE as error:
                # The lease expires by itself; the task's record stays until a later run of it.
                log.warning("job %s: task %s's lease not released (%s)", job_id, task_id, error)

    def _renew(self, job_id: str, task_id: str, record: dict[str, Any]) -> None:
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.tasks_key(job_id), task_id, json.dumps({**record, "renewed_at": now}))
        pipe.set(self.lease_key(job_id, task_id), b"1", px=max(1, int(self.lease_s * 1000)))
        pipe.hset(self.running_key, task_id, job_id)
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
                    back_by=min(
                        record["started_at"] + self.redelivery_s,
                        record["renewed_at"] + self.handed_back_after_s,
                    ),
                )
            )
        return sorted(lost, key=lambda task: task.started_at)

    @property
    def handed_back_after_s(self) -> float:
        """The longest a lost task waits, after its last renewal, to be put back on its queue
        by a live worker: its lease runs out, a sweep sees it lost, another a lease later
        still lost, and kombu's next look for expired messages puts it back."""
        return 2 * self.lease_s + 2 * self.sweep_every_s + self.restore_s

    def redeliver_lost(self) -> list[str]:
        """Hand back the running tasks lost for a whole lease since a sweep first saw them
        so (module docstring); returns their task ids."""
        handed_back = self.client.eval(
            REDELIVER_LOST_SCRIPT,
            3,
            self.running_key,
            UNACKED_KEY,
            UNACKED_INDEX_KEY,
            self.prefix,
            repr(self.lease_s),
        )
        return [task_id.decode() for task_id in handed_back]

    def announce_lost(self, jobs: JobStore, job_id: str) -> list[LostTask]:
        """The job's lost tasks; each is said once in the job's events (`task_lost`), by
        whichever reader of the job sees it first."""
        lost = self.lost(job_id)
        for task in lost:
            key = self._announced_key(job_id, task.task_id, task.started_at)
            if self.client.set(key, b"1", nx=True, ex=ANNOUNCED_KEPT_S):
                jobs.append_event(job_id, "task_lost", task.to_dict())
        return lost
