"""Which worker holds each task it received, so that one a dead worker held goes back soon.

A task's lease (workers/task_leases.py) is taken once the task starts its step. A worker
killed between receiving a task and taking its lease, or holding a task that waits for its
countdown (a step run again in a few seconds, as while a job waits for a device), leaves the
task's message unacknowledged with no lease to say it is lost: it would go back only once the
broker's visibility timeout has passed, minutes later.

So each worker's main process records the tasks it receives (Celery's `task_received`, in
`{prefix}received_tasks`, task id -> its holder, job and name as JSON) and keeps a short key
saying it is alive (`{prefix}worker:{holder}:alive`, renewed every third of a lease by its
sweeping thread); the holder is the worker's name and a token of its process, so that a
worker started again under the same name is not taken for the one that died. A live worker's
sweep finds the messages still unacknowledged whose worker is no longer alive and whose task
holds no lease; one still so a whole lease after the sweep that first saw it is handed back
the way a lost task is: its message marked expired in kombu's index, for kombu's next look
for expired messages to put back on its queue. The second look is what tells a dead worker
from one that Redis kept from renewing for a while. The sweep that hands a task back returns
its record, so that the job it belongs to can say so (workers/lost_task_sweeper.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis

from workers.task_leases import SWEEP_FUNCTIONS, UNACKED_INDEX_KEY, UNACKED_KEY

# Of the received tasks (KEYS[1], task id -> record, whose `holder` is the worker) whose
# message is still unacknowledged (in kombu's hash of them, KEYS[2], the Celery headers'
# id), those whose worker's alive key is gone and that hold no lease (not among the running
# tasks, KEYS[4]): the first sweep to see one so marks when; one a whole lease (ARGV[2])
# later, still so, has its message marked as handed out at time 0 in kombu's index
# (KEYS[3]). A received task whose message is gone (acknowledged, or put back) is forgotten.
# Returns the tasks handed back as task id, record, seconds since its worker last said it
# was alive (at least), .... ARGV[1]: the key prefix.
REDELIVER_ORPHANED_SCRIPT = (
    SWEEP_FUNCTIONS
    + """
local received = redis.call('HGETALL', KEYS[1])
if #received == 0 then
    return {}
end
local now = server_now()
local lease_s = tonumber(ARGV[2])
local record, holder = {}, {}
for i = 1, #received, 2 do
    record[received[i]] = received[i + 1]
    local ok, decoded = pcall(cjson.decode, received[i + 1])
    if ok and type(decoded) == 'table' and type(decoded['holder']) == 'string' then
        holder[received[i]] = decoded['holder']
    else  -- recorded by an earlier release: the holder alone
        holder[received[i]] = received[i + 1]
    end
end
local unacked = redis.call('HGETALL', KEYS[2])
local pending = {}
local handed_back = {}
for i = 1, #unacked, 2 do
    local task = task_of(unacked[i + 1])
    if task and holder[task] and not pending[task] then
        pending[task] = true
        local mark = ARGV[1] .. 'task:' .. task .. ':holder_lost_since'
        local alive = ARGV[1] .. 'worker:' .. holder[task] .. ':alive'
        local since = false
        if redis.call('EXISTS', alive) == 1 or redis.call('HEXISTS', KEYS[4], task) == 1 then
            redis.call('DEL', mark)
        else
            since = lost_for_a_lease(mark, now, lease_s)
        end
        if since then
            local score = redis.call('ZSCORE', KEYS[3], unacked[i])
            if score and tonumber(score) > 0 then  -- 0: handed back already, as lost
                redis.call('ZADD', KEYS[3], 'XX', 0, unacked[i])
                -- Its alive key lasted a lease after the worker last renewed it.
                local silent_s = now - since + lease_s
                table.insert(handed_back, task)
                table.insert(handed_back, record[task])
                table.insert(handed_back, tostring(silent_s))
            end
            redis.call('HDEL', KEYS[1], task)
            redis.call('DEL', mark)
        end
    end
end
for task, _ in pairs(holder) do
    if not pending[task] then
        redis.call('HDEL', KEYS[1], task)
        redis.call('DEL', ARGV[1] .. 'task:' .. task .. ':holder_lost_since')
    end
end
return handed_back
"""
)


@dataclass(frozen=True)
class OrphanedTask:
    """A task handed back because the worker that received it is gone."""

    task_id: str
    holder: str  # the worker's name and its process's token (workers/lost_task_sweeper.py)
    job_id: str | None  # None where the task's record does not say (an earlier release's)
    name: str
    received_at: float | None
    silent_s: float  # since its worker last said it was alive, at least

    @property
    def worker(self) -> str:
        """The worker's name, as Celery and the job's events know it."""
        return self.holder.partition("#")[0]

    @classmethod
    def parse(cls, task_id: bytes, stored: bytes, silent_s: bytes) -> OrphanedTask:
        """From the sweep's answer: the task's id, its stored record and the silence."""
        try:
            record = json.loads(stored)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("holder"), str):
            record = {"holder": stored.decode(errors="replace")}  # an earlier release's
        job_id = record.get("job_id")
        received_at = record.get("received_at")
        return cls(
            task_id=task_id.decode(),
            holder=record["holder"],
            job_id=job_id if isinstance(job_id, str) else None,
            name=str(record.get("name") or "a task"),
            received_at=float(received_at) if isinstance(received_at, int | float) else None,
            silent_s=float(silent_s),
        )


class TaskHolders:
    """One Redis connection's view of which worker holds each task it received. `lease_s`:
    how long a worker's alive key lasts after its last renewal, and how long a task stays
    orphaned after a sweep first saw it so before it is handed back."""

    def __init__(self, client: redis.Redis, lease_s: float, prefix: str = "archtree:") -> None:
        self.client = client
        self.lease_s = lease_s
        self.prefix = prefix

    @property
    def received_key(self) -> str:
        return f"{self.prefix}received_tasks"

    def alive_key(self, worker: str) -> str:
        return f"{self.prefix}worker:{worker}:alive"

    def received(
        self, task_id: str, worker: str, job_id: str | None = None, name: str = ""
    ) -> None:
        """Record that `worker` (its holder name) received the task of job `job_id` named
        `name` (and is alive)."""
        record = {"holder": worker, "job_id": job_id, "name": name, "received_at": time.time()}
        pipe = self.client.pipeline(transaction=False)
        pipe.hset(self.received_key, task_id, json.dumps(record))
        self.alive(worker, pipe)
        pipe.execute()

    def alive(self, worker: str, client: redis.Redis | None = None) -> None:
        """Say `worker` is alive for another lease (through `client`: a pipeline)."""
        client = client or self.client
        client.set(self.alive_key(worker), b"1", px=max(1, int(self.lease_s * 1000)))

    def redeliver_orphaned(self, running_key: str) -> list[OrphanedTask]:
        """Hand back the received tasks whose worker died before they took a lease (module
        docstring); `running_key` is the leases' hash of running tasks. Returns them."""
        handed_back = self.client.eval(
            REDELIVER_ORPHANED_SCRIPT,
            4,
            self.received_key,
            UNACKED_KEY,
            UNACKED_INDEX_KEY,
            running_key,
            self.prefix,
            repr(self.lease_s),
        )
        return [OrphanedTask.parse(*handed_back[i : i + 3]) for i in range(0, len(handed_back), 3)]
