"""Latency oracle that asks device agents, through Redis, to time architectures.

Agents of one device class are interchangeable by definition, so results are cached in the
shared cache under a class-level fingerprint (device class, batch size, dtype, input shape)
and any agent of the class may answer any request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import redis

from latency.cache import LatencyCache, decoded
from latency.device_registry import DeviceRegistry
from latency.fingerprint import timing_key
from latency.measurement_protocol import (
    CONSUMER_GROUP,
    MeasurementReply,
    MeasurementRequest,
    ProtocolError,
    send_request,
    stream_id_tuple,
    stream_key,
    text,
    validate_device_class,
)
from latency.redis_cache import RedisLatencyCache
from search.errors import ArchtreeError, SearchCancelled
from search.interfaces import LatencyMeasurement, TimingStats

if TYPE_CHECKING:
    from search.arch_spec import ArchSpec


class MeasurementCancelled(SearchCancelled):
    """The caller cancelled (its job was cancelled) while a measurement was outstanding."""


class DeviceAbsent(Exception):
    """No agent of the device class has been online for `release_after_s`: the caller chose to
    give its thread back and wait elsewhere rather than hold it while the device is away."""

    def __init__(self, device_class: str) -> None:
        super().__init__(f"no agent of device class {device_class} online")
        self.device_class = device_class


class RemoteOracle:
    """LatencyOracle whose timings are done by the agents of one device class.

    Each measurement not in the cache is one stream entry and one reply. While no agent of
    the class is online, `on_waiting(True)` is called (and `on_waiting(False)` once one is),
    and the oracle waits up to `wait_for_device_s`; or, given `release_after_s`, raises
    DeviceAbsent once the class has had no agent online for that long, so that a caller that
    can wait without a thread (a Celery task) does so. The reply timeout `timeout_s` runs from
    the moment an agent takes the request (a long queue is not a failure); a request not
    answered within it is sent once more, then ArchtreeError. `cancelled()` is checked every
    `poll_s` seconds. `on_measured(agent_id)` is called for each reply, with the agent that
    answered it.

    Counters: `measurements` (replies received) and `cache_hits`; `round_trip_s` (request
    sent to reply received) and `agent_timing_s` (time the agent spent timing) hold one value
    per measurement, for export as metrics.
    """

    def __init__(
        self,
        client: redis.Redis,
        device_class: str,
        *,
        batch_size: int = 1,
        dtype: str = "float32",
        cache: LatencyCache | None = None,
        timeout_s: float = 120.0,
        wait_for_device_s: float = 600.0,
        release_after_s: float | None = None,
        poll_s: float = 0.5,
        on_waiting: Callable[[bool], None] | None = None,
        on_measured: Callable[[str], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
        registry: DeviceRegistry | None = None,
        api_url: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ArchtreeError(f"batch size must be >= 1, got {batch_size}")
        self.client = client
        self.device_class = validate_device_class(device_class)
        self.batch_size = batch_size
        self.dtype = dtype
        self.cache: LatencyCache = cache if cache is not None else RedisLatencyCache(client)
        self.timeout_s = timeout_s
        self.wait_for_device_s = wait_for_device_s
        self.release_after_s = release_after_s
        self.poll_s = poll_s
        self.on_waiting = on_waiting
        self.on_measured = on_measured
        self.cancelled = cancelled
        self.registry = registry if registry is not None else DeviceRegistry(client)
        self.api_url = api_url
        self.measurements = 0
        self.cache_hits = 0
        self.round_trip_s: list[float] = []
        self.agent_timing_s: list[float] = []
        self._last_input_shape: tuple[int, ...] | None = None
        self._last_agent_fingerprint: dict[str, Any] = {}
        self._lock = threading.Lock()

    def fingerprint(self) -> dict[str, Any]:
        """The class-level fingerprint, completed by what the last answering agent reported."""
        return {**self._last_agent_fingerprint, **self._class_fingerprint(self._last_input_shape)}

    def offer_model(self, spec: ArchSpec, model: object) -> None:
        """Agents build candidates from the spec on their own device: nothing to keep here."""

    def measure_reference(
        self, reference: ArchSpec, *, confirm: bool = False, refresh: bool = False
    ) -> TimingStats:
        """Time the unpruned model alone on an agent: the job's baseline L(M0). A timing in the
        cache is used unless `refresh`, which times it again and caches the new timing."""
        input_shape = tuple(reference.input_shape)
        self._last_input_shape = input_shape
        key = self._key(reference, reference, "ref", confirm)
        cached = None if refresh or key is None else self.cache.get(key)
        stats = decoded(cached, lambda entry: TimingStats(**entry))
        if stats is not None:
            self._count_hit()
            return replace(stats, cached=True)
        spec_json = reference.to_json()
        result = self._round_trip(
            MeasurementRequest(
                candidate=spec_json,
                reference=spec_json,
                kind="ref",
                confirm=confirm,
                batch_size=self.batch_size,
                dtype=self.dtype,
            ),
            reference.hash,
        )
        try:
            stats = TimingStats(**result["reference"])
        except (KeyError, TypeError) as error:
            raise ArchtreeError(
                f"an agent of device class {self.device_class} sent a malformed reply "
                f"({error!r}): run agents of the same Archtree version as the service"
            ) from None
        if key is not None:
            self.cache.put(key, stats.to_dict())
        return stats

    def measure(
        self, candidate: ArchSpec, reference: ArchSpec, *, confirm: bool = False
    ) -> LatencyMeasurement:
        """Time `candidate` interleaved with `reference` on an agent; cached results are
        returned with `cached=True` and no request is sent."""
        input_shape = tuple(reference.input_shape)
        if tuple(candidate.input_shape) != input_shape:
            raise ValueError(
                f"candidate input shape {candidate.input_shape} differs from the reference's "
                f"{reference.input_shape}"
            )
        self._last_input_shape = input_shape
        key = self._key(candidate, reference, "pair", confirm)
        hit = None if key is None else decoded(self.cache.get(key), LatencyMeasurement.from_dict)
        if hit is not None:
            self._count_hit()
            with self._lock:
                # An agent of this class measured it: what it reported about its device (the
                # channel block the search widens to) holds for a job served from the cache.
                if not self._last_agent_fingerprint and isinstance(hit.fingerprint, dict):
                    self._last_agent_fingerprint = dict(hit.fingerprint)
            return replace(hit, cached=True)
        result = self._round_trip(
            MeasurementRequest(
                candidate=candidate.to_json(),
                reference=reference.to_json(),
                kind="pair",
                confirm=confirm,
                batch_size=self.batch_size,
                dtype=self.dtype,
            ),
            candidate.hash,
        )
        try:
            measurement = LatencyMeasurement.from_dict(result)
        except (KeyError, TypeError, ValueError) as error:
            raise ArchtreeError(
                f"an agent of device class {self.device_class} sent a malformed reply "
                f"({error!r}): run agents of the same Archtree version as the service"
            ) from None
        if key is not None:
            self.cache.put(key, replace(measurement, cached=False).to_dict())
        return measurement

    def _round_trip(self, request: MeasurementRequest, arch_hash: str) -> dict[str, Any]:
        """Send `request` and wait for its reply; return the reply's result."""
        started = time.monotonic()
        reply = self._await_reply(request)
        if reply.error is not None:
            raise ArchtreeError(
                f"agent {reply.agent_id} of device class {self.device_class} could not "
                f"measure architecture {arch_hash}: {reply.error}"
            )
        result = reply.result or {}
        round_trip_s = time.monotonic() - started
        self.registry.record_measurement(self.device_class, reply.agent_id, round_trip_s)
        if self.on_measured is not None:
            self.on_measured(reply.agent_id)
        with self._lock:
            self.measurements += 1
            self.round_trip_s.append(round_trip_s)
            self.agent_timing_s.append(reply.timing_s)
            fingerprint = result.get("fingerprint")
            if isinstance(fingerprint, dict):
                self._last_agent_fingerprint = dict(fingerprint)
        return result

    def _await_reply(self, request: MeasurementRequest) -> MeasurementReply:
        entry_id = send_request(self.client, self.device_class, request)
        resent = False
        # When an agent took the request; the reply timeout runs from then, not from sending,
        # so a request queued behind others is not mistaken for a lost one.
        taken_at: float | None = None
        waiting_since: float | None = None
        try:
            while True:
                if self.cancelled is not None and self.cancelled():
                    raise MeasurementCancelled(
                        f"measurement {request.request_id} on {self.device_class} cancelled"
                    )
                now = time.monotonic()
                if self.registry.live_agents(self.device_class) == 0:
                    if waiting_since is None:
                        waiting_since = now
                        self._notify_waiting(True)
                    elif now - waiting_since >= self.wait_for_device_s:
                        raise ArchtreeError(self._no_agent_message())
                    elif (
                        self.release_after_s is not None
                        and now - waiting_since >= self.release_after_s
                    ):
                        raise DeviceAbsent(self.device_class)
                elif waiting_since is not None:
                    waiting_since = None
                    taken_at = None
                    self._notify_waiting(False)
                popped = self.client.blpop([request.reply_to], timeout=self.poll_s)
                if popped is not None:
                    self.client.delete(request.reply_to)
                    if waiting_since is not None:  # an agent came and answered meanwhile
                        self._notify_waiting(False)
                    return self._parse_reply(popped[1])
                if waiting_since is not None:
                    continue
                if taken_at is None:
                    if self._taken(entry_id):
                        taken_at = time.monotonic()
                    continue
                if time.monotonic() - taken_at < self.timeout_s:
                    continue
                if resent:
                    raise ArchtreeError(
                        f"no reply from the agents of device class {self.device_class} within "
                        f"{self.timeout_s:g} s of taking request {request.request_id} (sent "
                        "twice): check the agents' output for errors"
                    )
                self._withdraw(entry_id)
                entry_id = send_request(self.client, self.device_class, request)
                resent = True
                taken_at = None
        except BaseException:
            # Nobody waits for this request any more: agents must not spend time on it.
            self._withdraw(entry_id)
            raise

    def _parse_reply(self, payload: bytes | str) -> MeasurementReply:
        try:
            return MeasurementReply.from_json(payload)
        except ProtocolError as error:
            raise ArchtreeError(
                f"an agent of device class {self.device_class} sent a malformed reply "
                f"({error}): run agents of the same Archtree version as the service"
            ) from None

    def _taken(self, entry_id: str) -> bool:
        """Whether the consumer group has delivered `entry_id` to an agent."""
        for group in self.client.xinfo_groups(stream_key(self.device_class)):
            if text(group["name"]) == CONSUMER_GROUP:
                return stream_id_tuple(group["last-delivered-id"]) >= stream_id_tuple(entry_id)
        return False

    def _withdraw(self, entry_id: str) -> None:
        self.client.xdel(stream_key(self.device_class), entry_id)

    def _notify_waiting(self, waiting: bool) -> None:
        if self.on_waiting is not None:
            self.on_waiting(waiting)

    def _no_agent_message(self) -> str:
        return no_agent_message(self.device_class, self.wait_for_device_s, self.api_url)

    def _count_hit(self) -> None:
        with self._lock:
            self.cache_hits += 1

    def _class_fingerprint(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        return {
            "device_class": self.device_class,
            "batch_size": self.batch_size,
            "dtype": self.dtype,
            "input_shape": list(input_shape) if input_shape is not None else None,
        }

    def _key(
        self, candidate: ArchSpec, reference: ArchSpec, kind: str, confirm: bool
    ) -> str | None:
        # What the class's agents time with: timings taken with other threads or another
        # runtime version (agents since replaced) are not reused.
        device = {
            **self._class_fingerprint(tuple(reference.input_shape)),
            "agent_timing": self.registry.class_timing(self.device_class),
        }
        return timing_key(device, candidate, reference, kind, confirm)


def no_agent_message(device_class: str, waited_s: float, api_url: str | None = None) -> str:
    """Why a job failed for want of an agent of its device class, and how to start one."""
    return (
        f"no agent of device class {device_class} has been online for {waited_s:g} s: start "
        f"one with `archtree agent --api {api_url or 'URL'} --device-class {device_class}`"
    )
