"""Jobs in Redis: their spec, status, progress, search state and event stream.

Keys (prefix `archtree:`):
- `job:{id}`          hash: spec (JSON), status, created_at, updated_at, error, progress (JSON),
                      api_url (the API it was submitted to, as its client reached it),
                      cancel_requested ("0"/"1"), state_depth
- `jobs`              sorted set of job ids by creation time (newest first when listed)
- `job:{id}:state`    the engine's SearchState as JSON, written after every depth
- `job:{id}:events`   a Redis Stream of the engine's events (kind + JSON data)
- `job:{id}:plan:{d}` the child tasks planned for depth d (JSON list), written once
- `job:{id}:children` hash: child id -> its first stored evaluation (JSON)
- `job:{id}:steps`    hash: orchestration steps already sent (so a redelivered task skips them)
- `job:{id}:reruns`   hash: task id -> how many times the task was run again for a Redis outage
- `job:{id}:agents`   hash: agent id -> measurements it answered for the job
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

# Redis errors that say it cannot be reached now (restarting, failing over), not that a
# request was wrong: whoever meets one waits for Redis and tries again.
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
STATUSES = ("queued", "waiting_for_device", "running", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")
# How long a client's Idempotency-Key names the job it submitted: a submission sent again
# with the same key within this time gets that job instead of a second one.
SUBMISSION_KEY_TTL_S = 24 * 3600

# Atomic, so that of two workers ending a job at once (a failure racing a cancel) the first
# decides, and a late "running" never revives an ended job.
_SET_STATUS_IF_ACTIVE = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current or current == ARGV[1] then return 0 end
if current == 'succeeded' or current == 'failed' or current == 'cancelled' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[3]) end
return 1
"""

# Atomic, so that of cancels asked at once exactly one is recorded (one `cancel_requested`
# event), and none is recorded for a job that has just ended. Returns 0 when the job does not
# exist or has ended, 1 when the cancel is recorded now, 2 when one was recorded before. A job
# no worker is on (queued, or waiting for its device before its first step: no state yet) is
# cancelled here.
_REQUEST_CANCEL = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
if current == 'succeeded' or current == 'failed' or current == 'cancelled' then return 0 end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then return 2 end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
redis.call('HSET', KEYS[1], 'cancel_requested', '1')
local no_state = redis.call('EXISTS', KEYS[3]) == 0
if current == 'queued' or (current == 'waiting_for_device' and no_state) then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'updated_at', ARGV[2])
    redis.call('XADD', KEYS[2], '*', 'event', ARGV[3])
end
return 1
"""


def _event_payload(kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, "time": time.time(), **data}, default=float)


# Delete an ended job's record and take it off the index: 1, or 0 when there is no such
# job or it has not ended (it is left as it is).
_DELETE_ENDED = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'succeeded' and status ~= 'failed' and status ~= 'cancelled' then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


# Count one more in a field of a job's counting hash (KEYS[2]) only while the job's record
# (KEYS[1]) exists: a task still running for a job deleted, or lost with an emptied Redis,
# leaves no key behind that nothing would delete. Returns the new count, 0 for no job.
_COUNT_FOR_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
"""


class JobStore:
    """One Redis connection's view of all jobs."""

    def __init__(self, client: redis.Redis, prefix: str = "archtree:") -> None:
        self.client = client
        self.prefix = prefix
        self._set_status_if_active = client.register_script(_SET_STATUS_IF_ACTIVE)
        self._request_cancel = client.register_script(_REQUEST_CANCEL)
        self._delete_ended = client.register_script(_DELETE_ENDED)
        self._count_for_job = client.register_script(_COUNT_FOR_JOB)

    def _key(self, job_id: str, suffix: str = "") -> str:
        return f"{self.prefix}job:{job_id}{suffix}"

    def create(
        self,
        spec: dict[str, Any],
        job_id: str | None = None,
        notes: list[str] | None = None,
        api_url: str | None = None,
        store_marker: str | None = None,
    ) -> str:
        """Store a new queued job (with `notes` in its progress, when given, the address of
        the API it was submitted to, and the file its submission put in the artifact store,
        which a worker checks its own store holds); returns its id."""
        job_id = job_id or uuid.uuid4().hex[:12]
        now = time.time()
        with self.client.pipeline() as pipe:
            pipe.hset(
                self._key(job_id),
                mapping={
                    "spec": json.dumps(spec),
                    "status": "queued",
                    "created_at": now,
                    "updated_at": now,
                    "error": "",
                    "progress": json.dumps(
                        {"notes": list(notes), "submission_notes": list(notes)} if notes else {}
                    ),
                    "cancel_requested": "0",
                    "api_url": api_url or "",
                    "store_marker": store_marker or "",
                },
            )
            pipe.zadd(f"{self.prefix}jobs", {job_id: now})
            pipe.execute()
        self.append_event(job_id, "queued", {})
        return job_id

    def claim_submission(
        self, key: str, job_id: str, fingerprint: str = ""
    ) -> tuple[str, str] | None:
        """Name `job_id` as the job of the submission `key` (a client's Idempotency-Key) for
        SUBMISSION_KEY_TTL_S, with the `fingerprint` of what was submitted, unless a
        submission with that key came first: then its job id (which may still be being
        checked, and not exist yet) and fingerprint."""
        claim = self._submission_key(key)
        if self.client.set(claim, f"{job_id}:{fingerprint}", nx=True, ex=SUBMISSION_KEY_TTL_S):
            return None
        earlier = self.client.get(claim)
        if earlier is None:  # it expired, or was released, in between
            return self.claim_submission(key, job_id, fingerprint)
        earlier_job, _, earlier_fingerprint = earlier.decode().partition(":")
        return earlier_job, earlier_fingerprint

    def release_submission(self, key: str, job_id: str) -> None:
        """Free `key` for another submission, if `job_id` still holds it (its job was never
        created)."""
        claim = self._submission_key(key)
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(claim)
                held = pipe.get(claim)
                if held is not None and held.decode().partition(":")[0] == job_id:
                    pipe.multi()
                    pipe.delete(claim)
                    pipe.execute()
            except redis.WatchError:
                pass  # it changed hands: it is no longer this job's to free

    def _submission_key(self, key: str) -> str:
        return f"{self.prefix}submission:{key}"

    def key(self, job_id: str) -> str:
        """The Redis key of a job's hash (async readers in the API read it directly)."""
        return self._key(job_id)

    @property
    def index_key(self) -> str:
        """The sorted set of job ids by creation time."""
        return f"{self.prefix}jobs"

    @staticmethod
    def record(job_id: str, raw: dict[bytes, bytes]) -> dict[str, Any] | None:
        """A job hash as Redis answers it, decoded; None when the hash is empty."""
        data = {k.decode(): v.decode() for k, v in (raw or {}).items()}
        if "status" not in data or "spec" not in data:
            return None  # none, or a partial hash left by a write racing the job's loss
        return {
            "id": job_id,
            "status": data["status"],
            "spec": json.loads(data["spec"]),
            "created_at": float(data["created_at"]),
            "updated_at": float(data["updated_at"]),
            "error": data.get("error") or None,
            "progress": json.loads(data.get("progress") or "{}"),
            "cancel_requested": data.get("cancel_requested") == "1",
            "api_url": data.get("api_url") or None,
        }

    def get(self, job_id: str) -> dict[str, Any] | None:
        return self.record(job_id, self.client.hgetall(self._key(job_id)))

    def store_marker(self, job_id: str) -> str | None:
        """The file the job's submission put in the artifact store, if it put one."""
        marker = self.client.hget(self._key(job_id), "store_marker")
        return marker.decode() if marker else None

    def list(self, offset: int = 0, limit: int = 20) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, and the total count."""
        ids = self.client.zrevrange(self.index_key, offset, offset + limit - 1)
        jobs = [self.get(i.decode()) for i in ids]
        return [j for j in jobs if j is not None], int(self.client.zcard(self.index_key))

    def set_status(self, job_id: str, status: str, error: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        mapping: dict[str, Any] = {"status": status, "updated_at": time.time()}
        if error is not None:
            mapping["error"] = error
        self.client.hset(self._key(job_id), mapping=mapping)
        self.append_event(job_id, "status", {"status": status, "error": error})

    def set_status_if_active(self, job_id: str, status: str, error: str | None = None) -> bool:
        """Move a job that has not ended to `status`; False when it has ended, or is there."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        changed = self._set_status_if_active(
            keys=[self._key(job_id)], args=[status, time.time(), error or ""]
        )
        if changed:
            self.append_event(job_id, "status", {"status": status, "error": error})
        return bool(changed)

    def update_progress(self, job_id: str, **progress: Any) -> None:
        """Merge fields into the job's progress (depth, candidates_evaluated, best, ...)."""
        current = self.get(job_id)
        if current is None:
            return  # the job is gone (Redis lost its data): do not write a partial record
        merged = {**current["progress"], **progress}
        self.client.hset(
            self._key(job_id),
            mapping={"progress": json.dumps(merged, default=float), "updated_at": time.time()},
        )

    def save_state(self, job_id: str, state: dict[str, Any]) -> None:
        self.client.set(self._key(job_id, ":state"), json.dumps(state, default=float))

    def load_state(self, job_id: str) -> dict[str, Any] | None:
        raw = self.client.get(self._key(job_id, ":state"))
        return json.loads(raw) if raw else None

    def save_state_if(self, job_id: str, state: dict[str, Any], expected_depth: int | None) -> bool:
        """Write the state only if the stored one is at `expected_depth` (None: no state yet).

        False when another task got there first: of two runs of the same step, one wins.
        """
        return self._write_if_depth(job_id, expected_depth, {self._key(job_id, ":state"): state})

    def save_plan(
        self, job_id: str, depth: int, tasks: list[dict[str, Any]], state: dict[str, Any]
    ) -> bool:
        """Store the tasks planned for `depth` with the state planning left, once.

        False (nothing written) when that depth was planned already or the state moved on.
        """
        plan_key = self._key(job_id, f":plan:{depth}")
        values = {plan_key: tasks, self._key(job_id, ":state"): state}
        return self._write_if_depth(job_id, depth - 1, values, absent=plan_key)

    def load_plan(self, job_id: str, depth: int) -> list[dict[str, Any]] | None:
        raw = self.client.get(self._key(job_id, f":plan:{depth}"))
        return json.loads(raw) if raw else None

    def _write_if_depth(
        self,
        job_id: str,
        expected_depth: int | None,
        values: dict[str, Any],
        absent: str | None = None,
    ) -> bool:
        state_key = self._key(job_id, ":state")
        watched = [state_key] + ([absent] if absent else [])
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(*watched)
                raw = pipe.get(state_key)
                depth = json.loads(raw)["depth"] if raw else None
                if depth != expected_depth or (absent is not None and pipe.exists(absent)):
                    pipe.unwatch()
                    return False
                pipe.multi()
                for key, value in values.items():
                    pipe.set(key, json.dumps(value, default=float))
                pipe.execute()
            except redis.WatchError:
                return False
        return True

    def save_child_result(self, job_id: str, child_id: str, result: dict[str, Any]) -> bool:
        """Keep the first evaluation stored for a child; False if one was stored before."""
        payload = json.dumps(result, default=float)
        return bool(self.client.hsetnx(self._key(job_id, ":children"), child_id, payload))

    def count_children_evaluated(self, job_id: str) -> int:
        """Children whose evaluation ended and was stored (their retunes aside), those of a
        depth still open included."""
        fields = self.client.hkeys(self._key(job_id, ":children"))
        return sum(1 for field in fields if b"/" not in _as_bytes(field))

    def load_child_result(self, job_id: str, child_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(self._key(job_id, ":children"), child_id)
        return json.loads(raw) if raw else None

    def mark_step(self, job_id: str, step: str) -> None:
        """Remember that an orchestration step (e.g. `run_depth:2`) was sent."""
        self.client.hset(self._key(job_id, ":steps"), step, time.time())

    def step_done(self, job_id: str, step: str) -> bool:
        return bool(self.client.hexists(self._key(job_id, ":steps"), step))

    def count_rerun(self, job_id: str, task_id: str) -> int:
        """Count one more re-run of the job's task `task_id`; return how many there were (0,
        and nothing counted, when the job does not exist)."""
        keys = [self._key(job_id), self._key(job_id, ":reruns")]
        return int(self._count_for_job(keys=keys, args=[task_id]))

    def count_child_run(self, job_id: str, child_id: str) -> int:
        """Count one more run of the evaluation of `child_id`; return how many there were:
        above 1, an earlier run was cut short (its worker lost, restarted, or Redis away)."""
        keys = [self._key(job_id), self._key(job_id, ":child_runs")]
        return int(self._count_for_job(keys=keys, args=[child_id]))

    def count_agent_measurement(self, job_id: str, agent_id: str) -> None:
        """Count one measurement of the job answered by the agent `agent_id` (none for a job
        that does not exist)."""
        self._count_for_job(keys=[self._key(job_id), self._key(job_id, ":agents")], args=[agent_id])

    def agent_measurements(self, job_id: str) -> dict[str, int]:
        """The job's measurements per agent that answered them, most first."""
        counts = self.client.hgetall(self._key(job_id, ":agents"))
        tally = {key.decode(): int(value) for key, value in counts.items()}
        return dict(sorted(tally.items(), key=lambda item: (-item[1], item[0])))

    def append_event(self, job_id: str, kind: str, data: dict[str, Any]) -> str:
        payload = _event_payload(kind, data)
        event_id = self.client.xadd(self._key(job_id, ":events"), {"event": payload})
        return event_id.decode()

    def read_events(
        self, job_id: str, after: str = "0-0", block_ms: int | None = None, count: int = 200
    ) -> list[tuple[str, dict[str, Any]]]:
        """Events after the given stream id, waiting up to `block_ms` for new ones."""
        answer = self.client.xread(
            {self._key(job_id, ":events"): after}, count=count, block=block_ms
        )
        events = []
        for _stream, entries in answer or []:
            for event_id, fields in entries:
                events.append((event_id.decode(), json.loads(fields[b"event"])))
        return events

    def request_cancel(self, job_id: str) -> bool:
        """Ask a job to stop; False when it does not exist or has already ended. Asked again
        (or by several clients at once), it is recorded once: one `cancel_requested` event."""
        # The event goes in with the flag: a worker that sees the flag ends the job with a
        # final `status` event, and a stream stops there, so the request must already be in it.
        recorded = self._request_cancel(
            keys=[self._key(job_id), self._key(job_id, ":events"), self._key(job_id, ":state")],
            args=[
                _event_payload("cancel_requested", {}),
                time.time(),
                _event_payload("status", {"status": "cancelled", "error": None}),
            ],
        )
        return recorded != 0

    def delete_ended(self, job_id: str) -> bool:
        """Forget an ended job: its record, events, state and every other key of it, and the
        Idempotency-Keys that name it (a submission sent again with one creates a new job).
        False when there is no such job, or it has not ended (it is left as it is)."""
        if not self._delete_ended(keys=[self._key(job_id), self.index_key], args=[job_id]):
            return False
        for key in self.client.scan_iter(match=f"{self._key(job_id)}:*", count=500):
            self.client.delete(key)
        for claim in self.client.scan_iter(match=self._submission_key("*"), count=500):
            held = self.client.get(claim)
            if held is not None and held.decode().partition(":")[0] == job_id:
                self.client.delete(claim)
        return True

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self._key(job_id), "cancel_requested") == b"1"

    def waiting_for_device(self) -> dict[str, int]:
        """Jobs waiting for an agent of their device class, per class."""
        ids = self.client.zrange(self.index_key, 0, -1)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._key(job_id.decode()), "status", "spec")
            answers = pipe.execute()
        waiting: dict[str, int] = {}
        for status, spec in answers:
            if status == b"waiting_for_device" and spec:
                device_class = json.loads(spec).get("device_class", "")
                waiting[device_class] = waiting.get(device_class, 0) + 1
        return waiting

    def counts_by_status(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        pipe = self.client.pipeline(transaction=False)
        for job_id in self.client.zrange(f"{self.prefix}jobs", 0, -1):
            pipe.hget(self._key(job_id.decode()), "status")
        for status in pipe.execute():
            if status:
                counts[status.decode()] = counts.get(status.decode(), 0) + 1
        return counts


class RedisEventSink:
    """Engine events into the job's event stream, so the API can stream them live.

    `fields` are added to every event (a worker adds its name as `worker`).
    """

    def __init__(self, store: JobStore, job_id: str, **fields: Any) -> None:
        self.store = store
        self.job_id = job_id
        self.fields = fields

    def emit(self, kind: str, **data: Any) -> None:
        self.store.append_event(self.job_id, kind, {**self.fields, **data})
        if kind == "note":  # shown with the job while it runs; the report's notes replace them
            notes = (self.store.get(self.job_id) or {}).get("progress", {}).get("notes") or []
            self.store.update_progress(self.job_id, notes=[*notes, data["message"]])
        elif kind == "baseline":  # kept with the job even when the search stops right after
            self.store.update_progress(
                self.job_id,
                baseline_ms=data["latency_ms"],
                budget_ms=data["budget_ms"],
                scored_by=data.get("scored_by"),
            )


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
