"""Registry of measurement agents in Redis: who is registered, who is online, what is queued.

Each device is a hash `archtree:device:{id}` (fields `info` as JSON, `registered_at`,
`last_seen`, and `stopped_at` once its agent stopped) listed in the set `archtree:devices`.
Times are the Redis server's clock, so agents on machines with skewed clocks are judged alike.
A device is online while its last heartbeat is younger than `heartbeat_ttl_s`, and its agent
has not said it stopped (an agent stopped by Ctrl-C or SIGTERM is offline at once, not once
its heartbeats are missed); records are never expired, so an offline device stays listed
until deleted.

An agent restarted on the same machine registers anew. Once its earlier record has gone
offline, `list` merges that record into the newest one of the same device (the same `info`:
class, host, runtime, cpu, gpu, threads), carrying its measurement count over, so restarts do
not pile up offline duplicates. An earlier agent that was only paused and comes back finds its
record gone and writes it again (`restore`): two live agents are two records.

Deleting a record takes the device out of service: its agent's next heartbeat returns False
and the agent stops (see latency/agent.py). It does not re-register, otherwise a delete could
never remove a running agent.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import redis

from latency.measurement_protocol import (
    CONSUMER_GROUP,
    STREAM_PREFIX,
    stream_id_tuple,
    stream_key,
    text,
    validate_device_class,
)
from search.errors import ArchtreeError

DEVICES_KEY = "archtree:devices"
# A device's id, as `register` makes it.
DEVICE_ID = re.compile(r"[0-9a-f]{12}")
DEVICE_PREFIX = "archtree:device:"
# Left by `delete` for a day: an agent whose record is gone stops only when it was deleted;
# a record lost with Redis's data (a restart without persistence, a failover) is written again.
DELETED_PREFIX = "archtree:device-deleted:"
DELETED_KEPT_S = 24 * 3600
# Left by a merge for a day: an agent of the merged record that was only paused is told so.
MERGED_PREFIX = "archtree:device-merged:"
# What the agents of a class time with (timing_settings), written by each registration:
# part of the class's latency cache keys, so that timings taken otherwise are not reused.
CLASS_TIMING_PREFIX = "archtree:class-timing:"
# Measurement counters for monitoring: per device class, per device, and the latest round-trip
# times per class (a capped list), written by the oracles in workers and read by the API.
MEASUREMENTS_KEY = "archtree:measurements:by_class"
DEVICE_MEASUREMENTS_KEY = "archtree:measurements:by_device"
ROUND_TRIP_SUM_KEY = "archtree:measurements:round_trip_sum_s"
ROUND_TRIPS_PREFIX = "archtree:measurements:round_trips:"
ROUND_TRIPS_KEPT = 1000

# What an agent times with, beyond its hardware: agents of one class stand in for each other
# and share its latency cache, so those online at once must agree on these.
TIMING_FIELDS = ("runtime", "runtime_version", "threads")


def timing_settings(info: dict[str, Any]) -> dict[str, Any]:
    """The fields of a device's info that its timings depend on (TIMING_FIELDS)."""
    return {name: info.get(name) for name in TIMING_FIELDS}


def serving_settings(info: dict[str, Any]) -> dict[str, Any]:
    """What agents of one class online at once must agree on: how they time, and the
    `module:` packages they build (else a job's measurement fails on some agents only)."""
    return {**timing_settings(info), "allowed_modules": sorted(info.get("allowed_modules") or [])}


def serving_text(settings: dict[str, Any]) -> str:
    runtime = " ".join(str(settings[name] or "") for name in ("runtime", "runtime_version"))
    threads = settings["threads"]
    modules = settings["allowed_modules"]
    built = f", building module: sources of {', '.join(modules)}" if modules else ""
    return f"{runtime.strip()} on {threads} thread{'' if threads == 1 else 's'}{built}"


class DeviceClassConflict(ArchtreeError):
    """An agent that would time otherwise than the agents of its class online."""

    def __init__(self, device_class: str, theirs: dict[str, Any], settings: dict[str, Any]) -> None:
        fixes = []
        if settings["allowed_modules"] != theirs["allowed_modules"]:
            fixes.append(
                " ".join(f"--allow-module {name}" for name in theirs["allowed_modules"])
                or "no --allow-module"
            )
        if settings["threads"] != theirs["threads"]:
            fixes.append(f"--threads {theirs['threads']}")
        if settings["runtime"] != theirs["runtime"]:
            fixes.append(f"--runtime {theirs['runtime']}")
        elif settings["runtime_version"] != theirs["runtime_version"]:
            fixes.append(f"{theirs['runtime']} {theirs['runtime_version']}")
        super().__init__(
            f"device class {device_class} has agents online that time with "
            f"{serving_text(theirs)}, and this one would time with {serving_text(settings)}: "
            "the agents of a class take each other's measurements, so they must time alike; "
            f"run this one with {' and '.join(fixes)}, or give it a device class of its own"
        )


# Checks existence and stamps the server time atomically, so a heartbeat racing a delete
# cannot resurrect a half-deleted record.
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  if redis.call('EXISTS', KEYS[3]) == 1 then return -2 end
  return -1
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'last_seen', now[1] .. '.' .. string.format('%06d', now[2]))
return 1
"""

# Removes a device's record and marks it deleted (KEYS[3], kept ARGV[2] seconds) in one step,
# only if it exists: an id that names no device leaves nothing behind.
_DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
return 1
"""

# Marks a device's record as stopped, unless it is gone (deleted or merged meanwhile): a
# record is never written back from its stop alone.
_STOP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'stopped_at', now[1] .. '.' .. string.format('%06d', now[2]))
return 1
"""

# Merges an offline record (KEYS[1], id ARGV[1]) into a newer one of the same device (KEYS[2],
# id ARGV[2]) in one step, so that a heartbeat in between keeps it, and two merges of the same
# record count its measurements once. KEYS[3]: the device set; KEYS[4]: counts per device;
# KEYS[5]: the merged record's marker, kept ARGV[4] seconds.
_MERGE = """
local seen = tonumber(redis.call('HGET', KEYS[1], 'last_seen'))
if seen == nil or redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local now = redis.call('TIME')
if tonumber(now[1]) + tonumber(now[2]) / 1e6 - seen < tonumber(ARGV[3]) then return 0 end
local counted = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '0')
if counted > 0 then redis.call('HINCRBY', KEYS[4], ARGV[2], counted) end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[4])
return 1
"""


# How often an agent stamps its heartbeat. The heartbeat TTL must leave room for at least two
# beats, or an agent busy for a moment, or one beat lost, reads as offline.
AGENT_HEARTBEAT_S = 3.0
MIN_HEARTBEAT_TTL_S = 2 * AGENT_HEARTBEAT_S


class DeviceRegistry:
    """Registered measurement agents, their liveness, and the request queue per device class."""

    def __init__(self, client: redis.Redis, heartbeat_ttl_s: float = 15.0) -> None:
        self.client = client
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._merge = client.register_script(_MERGE)
        self._stop = client.register_script(_STOP)

    def register(self, info: dict[str, Any]) -> dict[str, Any]:
        """Store a new device (info: device_class, host, runtime, runtime_version, cpu, gpu,
        threads); return its record with the assigned `id` and `registered_at`.
        DeviceClassConflict when the agents of its class online time otherwise."""
        device_class = info.get("device_class", "")
        validate_device_class(device_class)
        settings = serving_settings(info)
        for record in self.list():
            theirs = serving_settings(record)
            if (
                record["online"]
                and record.get("device_class") == device_class
                and (theirs != settings)
            ):
                raise DeviceClassConflict(device_class, theirs, settings)
        device_id = uuid.uuid4().hex[:12]
        self._write(device_id, info)
        timing = json.dumps(timing_settings(info), sort_keys=True)
        self.client.set(CLASS_TIMING_PREFIX + device_class, timing)
        record = self.get(device_id)
        assert record is not None
        return record

    def heartbeat(self, device_id: str) -> bool:
        """Mark the device as seen now; False if it is unknown or was deleted."""
        return self.heartbeat_status(device_id) == "alive"

    def heartbeat_status(self, device_id: str) -> str:
        """Mark the device as seen now: `alive`; else `deleted` (by `delete`), `merged` (its
        record, offline, was merged into a newer one of the same device: see the module), or
        `lost` (its record is gone, and neither asked for that)."""
        keys = [DEVICE_PREFIX + device_id, DELETED_PREFIX + device_id, MERGED_PREFIX + device_id]
        status = int(self._heartbeat(keys=keys))
        return {1: "alive", 0: "deleted", -1: "lost", -2: "merged"}[status]

    def stop(self, device_id: str) -> bool:
        """Mark the device offline now: its agent stopped. False if its record is gone."""
        return bool(self._stop(keys=[DEVICE_PREFIX + device_id]))

    def restore(self, device_id: str, info: dict[str, Any]) -> None:
        """Write a lost device's record again, under its id (see heartbeat_status)."""
        self._write(device_id, info)

    def _write(self, device_id: str, info: dict[str, Any]) -> None:
        """The device's record, registered and seen now."""
        now = self._server_time()
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(
                DEVICE_PREFIX + device_id,
                mapping={
                    "info": json.dumps(info, sort_keys=True),
                    "registered_at": repr(now),
                    "last_seen": repr(now),
                },
            )
            pipe.sadd(DEVICES_KEY, device_id)
            pipe.execute()

    def get(self, device_id: str) -> dict[str, Any] | None:
        """The device's record with `online` and `last_seen`, or None."""
        raw = self.client.hgetall(DEVICE_PREFIX + device_id)
        if not raw:
            return None
        return self._record(device_id, raw, self._server_time())

    def list(self) -> list[dict[str, Any]]:
        """All registered devices, oldest registration first; offline records of a device
        that registered again since are merged into its newest record (see the module)."""
        ids = sorted(str(text(member)) for member in self.client.smembers(DEVICES_KEY))
        with self.client.pipeline(transaction=False) as pipe:
            for device_id in ids:
                pipe.hgetall(DEVICE_PREFIX + device_id)
            raws = pipe.execute()
        now = self._server_time()
        records = [
            self._record(device_id, raw, now)
            for device_id, raw in zip(ids, raws, strict=True)
            if raw
        ]
        records.sort(key=lambda record: (record["registered_at"], record["id"]))
        merged = self._merge_superseded(records)
        return [record for record in records if record["id"] not in merged]

    def _merge_superseded(self, records: list[dict[str, Any]]) -> set[str]:
        """Merge each offline record into the newest record of the same device, registered
        after it; return the ids merged. `records`: oldest registration first."""
        newest: dict[str, dict[str, Any]] = {}
        for record in records:
            newest[self._identity(record)] = record
        merged = set()
        for record in records:
            latest = newest[self._identity(record)]
            if record is latest or record["online"]:
                continue
            keys = [
                DEVICE_PREFIX + record["id"],
                DEVICE_PREFIX + latest["id"],
                DEVICES_KEY,
                DEVICE_MEASUREMENTS_KEY,
                MERGED_PREFIX + record["id"],
            ]
            arguments = [record["id"], latest["id"], self.heartbeat_ttl_s, DELETED_KEPT_S]
            if self._merge(keys=keys, args=arguments):
                merged.add(record["id"])
        return merged

    @staticmethod
    def _identity(record: dict[str, Any]) -> str:
        """What tells devices apart: everything an agent registered."""
        stored = ("id", "registered_at", "last_seen", "online")
        return json.dumps({k: v for k, v in record.items() if k not in stored}, sort_keys=True)

    def delete(self, device_id: str) -> bool:
        """Remove the device; True if it existed (only then is its deletion marked)."""
        if not DEVICE_ID.fullmatch(device_id):
            return False
        keys = [DEVICE_PREFIX + device_id, DEVICES_KEY, DELETED_PREFIX + device_id]
        return bool(self.client.eval(_DELETE, len(keys), *keys, device_id, DELETED_KEPT_S))

    def class_timing(self, device_class: str) -> dict[str, Any] | None:
        """What the agents of `device_class` time with (`timing_settings`), as the last one
        to register said; None if none ever did."""
        stored = self.client.get(CLASS_TIMING_PREFIX + device_class)
        return json.loads(stored) if stored else None

    def live_agents(self, device_class: str) -> int:
        """How many devices of `device_class` are online."""
        return sum(
            1
            for record in self.list()
            if record["online"] and record.get("device_class") == device_class
        )

    def queue_depth(self, device_class: str) -> int:
        """Requests of `device_class` not answered yet.

        Counts stream entries not yet delivered to any agent plus entries delivered but not
        acknowledged (being timed now, or held by an agent that died until another claims
        them). Answered requests are acknowledged and deleted, so they never count.
        """
        key = stream_key(device_class)
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError:
            return 0  # no stream: nothing was ever requested
        group = next((g for g in groups if text(g["name"]) == CONSUMER_GROUP), None)
        if group is None:
            return int(self.client.xlen(key))
        lag = group.get("lag")
        if lag is None or lag > 0:
            # Redis cannot tell the lag when entries were deleted in between, and counts a
            # request deleted before delivery (its requester gave up) as still to deliver:
            # count the entries after the last delivered one.
            last = stream_id_tuple(group["last-delivered-id"])
            lag = len(self.client.xrange(key, min=f"({last[0]}-{last[1]}", max="+"))
        # Entries pending in the group but deleted (held by an agent that died, then given
        # up) are no longer requests: nothing counts beyond what the stream holds.
        return min(int(group["pending"]) + int(lag), int(self.client.xlen(key)))

    def record_measurement(self, device_class: str, device_id: str, round_trip_s: float) -> None:
        """Count a measurement answered by `device_id` and keep its round-trip time."""
        recent = ROUND_TRIPS_PREFIX + device_class
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(MEASUREMENTS_KEY, device_class, 1)
            pipe.hincrby(DEVICE_MEASUREMENTS_KEY, device_id, 1)
            pipe.hincrbyfloat(ROUND_TRIP_SUM_KEY, device_class, round_trip_s)
            pipe.lpush(recent, round_trip_s)
            pipe.ltrim(recent, 0, ROUND_TRIPS_KEPT - 1)
            pipe.execute()

    def measurement_stats(self) -> dict[str, dict[str, Any]]:
        """Measurements per class (`by_class`), per device (`by_device`), the round-trip sum
        per class (`round_trip_sum_s`) and the latest round-trip times per class (`recent_s`)."""

        def decoded(mapping: dict[Any, Any], kind: type) -> dict[str, Any]:
            return {str(text(k)): kind(text(v)) for k, v in mapping.items()}

        by_class = decoded(self.client.hgetall(MEASUREMENTS_KEY), int)
        return {
            "by_class": by_class,
            "by_device": decoded(self.client.hgetall(DEVICE_MEASUREMENTS_KEY), int),
            "round_trip_sum_s": decoded(self.client.hgetall(ROUND_TRIP_SUM_KEY), float),
            "recent_s": {
                name: [float(v) for v in self.client.lrange(ROUND_TRIPS_PREFIX + name, 0, -1)]
                for name in by_class
            },
        }

    def classes(self) -> list[str]:
        """Device classes with a registered device or a request stream."""
        found = {record.get("device_class") for record in self.list()}
        for key in self.client.scan_iter(match=STREAM_PREFIX + "*", _type="stream"):
            found.add(str(text(key))[len(STREAM_PREFIX) :])
        return sorted(name for name in found if name)

    def _record(self, device_id: str, raw: dict[Any, Any], now: float) -> dict[str, Any]:
        fields = {text(k): text(v) for k, v in raw.items()}
        last_seen = float(fields.get("last_seen") or 0.0)
        record = dict(json.loads(fields.get("info") or "{}"))
        record.update(
            id=device_id,
            registered_at=float(fields.get("registered_at") or 0.0),
            last_seen=last_seen,
            online=now - last_seen < self.heartbeat_ttl_s and not fields.get("stopped_at"),
        )
        return record

    def _server_time(self) -> float:
        seconds, microseconds = self.client.time()
        return seconds + microseconds / 1e6
