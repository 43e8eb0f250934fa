"""Measurement agent: runs on the target device and times the architectures workers send.

The agent reads its device class's request stream as a member of the consumer group (consumer
name = agent id), times each request with a timer object of its runtime, replies, and
acknowledges. Entries another agent took and left unacknowledged for `claim_idle_ms` (it died)
are claimed and timed here. A heartbeat thread keeps the agent online in the DeviceRegistry;
when its record was deleted the agent stops, and when the record was lost with Redis's data
(no delete asked for it) the agent writes it again and goes on.

An agent registered through the API serves from the Redis the API named. When that Redis stays
unreachable (`archtree up` restarted, with its Redis at a new address), the agent registers again
through the API and serves from the Redis the API names now. At its start, an agent waits a
while for an API or a Redis that is not up yet.

Runtimes plug in through `latency.runtimes.RUNTIMES`: each names its version and makes timers,
which are LatencyOracle objects for one (batch size, dtype).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import redis

from archtree_cli.client import checked_api_url, plain_http_instead, without_v1
from archtree_cli.environment import seconds_from_environment
from latency.device_registry import DeviceRegistry
from latency.fingerprint import cpu_model
from latency.harness import TimingSettings
from latency.local_oracle import check_threads
from latency.measurement_protocol import (
    CONSUMER_GROUP,
    MeasurementReply,
    MeasurementRequest,
    ProtocolError,
    ensure_group,
    send_reply,
    stream_key,
    text,
    validate_device_class,
)
from latency.redis_connection import check_redis_url, redacted, redis_client
from latency.runtimes import get_runtime
from search.errors import ArchtreeError
from search.interfaces import LatencyOracle

log = logging.getLogger("archtree.agent")

# A request whose timing killed this many agents (OOM, segfault) is answered with an error
# instead of being claimed again, so that one request cannot take down every agent in turn.
MAX_DELIVERIES = 3
# One agent keeps at most this many timers, one per (batch size, dtype) it was asked for.
TIMERS_KEPT = 4
# Waiting after Redis went away before trying again.
RECONNECT_WAIT_S = 1.0
# Redis unreachable this long, an agent registered through the API asks it again where Redis
# is: a restarted `archtree up` runs its Redis at a new address.
ASK_API_AFTER_S = 5.0
# Each answer that did not bring Redis back doubles the wait before the next question, up to
# this, as every registration adds a record to the API's Redis.
ASK_API_LONGEST_WAIT_S = 60.0
# An outage that lasts is said again at most this often, so a stopped service does not flood
# the agent's log.
OUTAGE_SAID_EVERY_S = 60.0
# How long an agent waits at its start for an API or a Redis that is not up yet.
START_WAIT_VARIABLE = "ARCHTREE_AGENT_START_WAIT_S"
DEFAULT_START_WAIT_S = 60.0
# The API's answers that say it is starting, restarting or without its Redis for now.
UNAVAILABLE_STATUSES = (502, 503, 504)

T = TypeVar("T")


class ServiceUnreachable(ArchtreeError):
    """The API or Redis cannot be reached, or not serve, for now: waiting may heal it."""


@dataclass
class RedisOutage:
    """Since when the agent's Redis has been unreachable, and when to ask the API again."""

    since: float
    next_ask: float
    ask_wait_s: float = ASK_API_AFTER_S
    # When the outage is next said again in the log (it is said when it starts).
    next_said: float = 0.0


def device_info(device_class: str, runtime: str = "torch", threads: int = 1) -> dict[str, Any]:
    """What an agent registers: device class, host, runtime and version, cpu, gpu, threads."""
    import socket

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device_class": validate_device_class(device_class),
        "host": socket.gethostname(),
        "runtime": runtime,
        "runtime_version": get_runtime(runtime).version(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "threads": threads,
    }


class MeasurementAgent:
    """Serves the timing requests of one device class from Redis.

    With `agent_id` None the agent registers itself in `registry` when it starts; otherwise
    it uses the id it was given (registered by the API). `register_again`, for an agent whose
    Redis the API named, registers it anew and returns (agent id, Redis URL): the agent calls
    it when Redis has been unreachable for ASK_API_AFTER_S, and serves from there. Sources
    `module:PKG...` are built only when PKG is in `allowed_modules`: building one imports and
    calls code named by whoever can write to Redis. Counters: `processed` (replies sent),
    `errors` (error replies), `claimed`.
    """

    def __init__(
        self,
        client: redis.Redis,
        device_class: str,
        *,
        runtime: str = "torch",
        threads: int = 1,
        agent_id: str | None = None,
        claim_idle_ms: int = 30000,
        block_ms: int = 1000,
        heartbeat_s: float = 3.0,
        registry: DeviceRegistry | None = None,
        settings: TimingSettings | None = None,
        allowed_modules: Sequence[str] = (),
        register_again: Callable[[], tuple[str, str]] | None = None,
    ) -> None:
        self.runtime = get_runtime(runtime)
        self.client = client
        self.device_class = validate_device_class(device_class)
        self.threads = threads
        self.agent_id = agent_id
        self.claim_idle_ms = claim_idle_ms
        self.block_ms = block_ms
        self.heartbeat_s = heartbeat_s
        self.registry = registry if registry is not None else DeviceRegistry(client)
        self.settings = settings
        self.allowed_modules = tuple(allowed_modules)
        self.register_again = register_again
        self.processed = 0
        self.errors = 0
        self.claimed = 0
        self.deleted = threading.Event()
        # Whether the registry shows the agent offline since it stopped (see `run`).
        self.said_offline = False
        self._stream = stream_key(device_class)
        self._timers: OrderedDict[tuple[int, str], LatencyOracle] = OrderedDict()
        # Held while the agent moves to another Redis, so that the heartbeat thread reads a
        # registry and an id of the same place.
        self._moving = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        """Serve requests until `stop` is set or the agent's registry record is deleted."""
        if self.agent_id is None:
            info = device_info(self.device_class, self.runtime.name, self.threads)
            self.agent_id = self.registry.register(info)["id"]
        ensure_group(self.client, self.device_class)
        halt = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat_loop, args=(halt,), name="agent-heartbeat", daemon=True
        )
        heartbeat.start()
        log.info("agent %s serving device class %s", self.agent_id, self.device_class)
        claim_every_s = min(max(self.claim_idle_ms / 2000, 0.05), 5.0)
        next_claim = 0.0
        outage: RedisOutage | None = None
        try:
            while not stop.is_set() and not self.deleted.is_set():
                try:
                    if time.monotonic() >= next_claim:
                        # Claimed one: more may be waiting, look again right away.
                        next_claim = 0.0 if self.claim_stale() else time.monotonic() + claim_every_s
                    self.handle_one()
                    if outage is not None:
                        log.warning(
                            "Redis answers again after %.0f s", time.monotonic() - outage.since
                        )
                    outage = None
                except (redis.ConnectionError, redis.TimeoutError) as error:
                    now = time.monotonic()
                    outage = outage or RedisOutage(since=now, next_ask=now + ASK_API_AFTER_S)
                    if now >= outage.next_said:
                        lasted = f" for {now - outage.since:.0f} s" if now > outage.since else ""
                        log.warning(
                            "Redis unreachable%s (%s); retrying every %.0f s, said again "
                            "every %.0f s while it lasts",
                            lasted,
                            error,
                            RECONNECT_WAIT_S,
                            OUTAGE_SAID_EVERY_S,
                        )
                        outage.next_said = now + OUTAGE_SAID_EVERY_S
                    if self.register_again is not None and now >= outage.next_ask:
                        self._move_to_the_service(outage)
                    stop.wait(RECONNECT_WAIT_S)
                except redis.ResponseError as error:
                    if "NOGROUP" not in str(error):
                        raise
                    # The stream was deleted (e.g. FLUSHDB): start over with a new group.
                    ensure_group(self.client, self.device_class)
        finally:
            halt.set()
            heartbeat.join()
        if self.deleted.is_set():
            log.warning("agent %s was deleted from the device registry; stopping", self.agent_id)
        else:
            self._say_offline()

    def _say_offline(self) -> None:
        """Mark the device offline in the registry now, so that jobs and `archtree submit`
        do not count on it while its heartbeats take `heartbeat_ttl_s` to go stale."""
        try:
            self.said_offline = self.registry.stop(self._consumer())
        except redis.RedisError as error:
            log.warning("could not mark agent %s offline (%s)", self.agent_id, error)

    def _move_to_the_service(self, outage: RedisOutage) -> None:
        """Register again through the API and serve from the Redis it names now."""
        assert self.register_again is not None
        now = time.monotonic()
        lost_for_s = now - outage.since
        try:
            agent_id, redis_url = self.register_again()
        except ArchtreeError as error:
            outage.next_ask = now + outage.ask_wait_s
            outage.ask_wait_s = min(2 * outage.ask_wait_s, ASK_API_LONGEST_WAIT_S)
            log.warning(
                "Redis unreachable for %.0f s, and registering again through the API failed: "
                "%s; retrying both",
                lost_for_s,
                error,
            )
            return
        try:
            client = redis_client(redis_url)
        except ValueError as error:
            outage.next_ask = now + ASK_API_AFTER_S
            log.warning(
                "the API named %r as its Redis, which is not a Redis URL (%s); check its "
                "ARCHTREE_AGENT_REDIS_URL; retrying",
                redacted(redis_url),
                error,
            )
            return
        outage.ask_wait_s = min(2 * outage.ask_wait_s, ASK_API_LONGEST_WAIT_S)
        outage.next_ask = now + outage.ask_wait_s
        previous = self.client
        with self._moving:
            self.client, self.registry, self.agent_id = client, DeviceRegistry(client), agent_id
        previous.close()
        log.warning(
            "Redis unreachable for %.0f s: registered again through the API as agent %s; "
            "serving from Redis at %s now",
            lost_for_s,
            agent_id,
            redacted(redis_url),
        )

    def handle_one(self, block_ms: int | None = None) -> bool:
        """Read at most one new request (waiting up to `block_ms`) and answer it."""
        entries = self.client.xreadgroup(
            CONSUMER_GROUP,
            self._consumer(),
            {self._stream: ">"},
            count=1,  # one at a time, so idle agents of the class share the queue
            block=self.block_ms if block_ms is None else block_ms,
        )
        for _, messages in entries or []:
            for entry_id, fields in messages:
                self._serve(str(text(entry_id)), fields or {})
                return True
        return False

    def claim_stale(self) -> bool:
        """Take over one request left unacknowledged longer than `claim_idle_ms`."""
        _, messages, *_ = self.client.xautoclaim(
            self._stream, CONSUMER_GROUP, self._consumer(), self.claim_idle_ms, "0-0", count=1
        )
        for entry_id, fields in messages:
            if fields is None:
                continue  # deleted by its requester, who no longer waits for it
            entry_id = str(text(entry_id))
            self.claimed += 1
            log.info("claimed request %s left by a dead agent", entry_id)
            if self._deliveries(entry_id) > MAX_DELIVERIES:
                self._answer_unsafe(entry_id, fields)
            else:
                self._serve(entry_id, fields)
            return True
        return False

    def timer(self, batch_size: int, dtype: str) -> LatencyOracle:
        """The timer for (batch size, dtype): its models and results stay cached in memory."""
        key = (batch_size, dtype)
        timer = self._timers.get(key)
        if timer is None:
            timer = self.runtime.make_timer(
                self.device_class, self.threads, batch_size, dtype, self.settings
            )
            self._timers[key] = timer
            if len(self._timers) > TIMERS_KEPT:
                self._timers.popitem(last=False)
        else:
            self._timers.move_to_end(key)
        return timer

    def _serve(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            request = MeasurementRequest.from_fields(fields)
        except ProtocolError as error:
            reply_to = text(fields.get(b"reply_to", fields.get("reply_to")))
            request_id = text(fields.get(b"request_id", fields.get("request_id"))) or "?"
            log.warning("malformed request %s: %s", entry_id, error)
            if reply_to:
                self._reply(reply_to, request_id, error=f"malformed request: {error}")
            self._ack(entry_id)
            return
        started = time.perf_counter()
        try:
            result = self._measure(request)
        # Whatever one request does wrong (bad spec, model that cannot be built, OOM in
        # torch), the agent answers with the error and goes on serving.
        except Exception as error:
            message = (str(error) if isinstance(error, ArchtreeError) else repr(error))[:1000]
            log.warning("request %s failed: %s", request.request_id, message)
            self._reply(request.reply_to, request.request_id, error=message)
        else:
            self._reply(
                request.reply_to,
                request.request_id,
                result=result,
                timing_s=time.perf_counter() - started,
            )
        self._ack(entry_id)

    def _measure(self, request: MeasurementRequest) -> dict[str, Any]:
        from search.arch_spec import ArchSpec

        reference = ArchSpec.from_json(request.reference)
        self._check_source(reference.model.source)
        timer = self.timer(request.batch_size, request.dtype)
        if request.kind == "ref":
            stats = timer.measure_reference(reference, confirm=request.confirm)
            return {"reference": stats.to_dict(), "fingerprint": self._fingerprint(timer)}
        candidate = ArchSpec.from_json(request.candidate)
        self._check_source(candidate.model.source)
        result = timer.measure(candidate, reference, confirm=request.confirm).to_dict()
        result["fingerprint"] = {**result["fingerprint"], "agent_id": self.agent_id}
        return result

    def _check_source(self, source: str) -> None:
        prefix, _, rest = source.partition(":")
        if prefix != "module":
            return
        package = rest.partition(":")[0]
        if not any(
            package == name or package.startswith(name + ".") for name in self.allowed_modules
        ):
            raise ArchtreeError(
                f"this agent does not build {source!r}: module: sources run code on the agent, "
                f"so start the agent with {package.split('.')[0]!r} among its allowed modules"
            )

    def _fingerprint(self, timer: LatencyOracle) -> dict[str, Any]:
        return {**timer.fingerprint(), "agent_id": self.agent_id}

    def _answer_unsafe(self, entry_id: str, fields: dict[Any, Any]) -> None:
        try:
            request = MeasurementRequest.from_fields(fields)
        except ProtocolError:
            self._ack(entry_id)
            return
        self._reply(
            request.reply_to,
            request.request_id,
            error=f"{MAX_DELIVERIES} agents died while timing this request; it is not retried",
        )
        self._ack(entry_id)

    def _reply(
        self,
        reply_to: str,
        request_id: str,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        timing_s: float = 0.0,
    ) -> None:
        reply = MeasurementReply(
            request_id=request_id,
            agent_id=str(self.agent_id),
            result=result,
            error=error,
            timing_s=timing_s,
        )
        send_reply(self.client, reply_to, reply)
        self.processed += 1
        if error is not None:
            self.errors += 1

    def _ack(self, entry_id: str) -> None:
        # Answered entries are deleted too, so the stream holds only outstanding requests.
        with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self._stream, CONSUMER_GROUP, entry_id)
            pipe.xdel(self._stream, entry_id)
            pipe.execute()

    def _deliveries(self, entry_id: str) -> int:
        pending = self.client.xpending_range(
            self._stream, CONSUMER_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    def _consumer(self) -> str:
        return str(self.agent_id)

    def _heartbeat_loop(self, halt: threading.Event) -> None:
        # A thread of its own, so a long timing never lets the agent look offline.
        failing = False
        while not halt.wait(self.heartbeat_s):
            with self._moving:
                registry, agent_id = self.registry, self._consumer()
            try:
                status = registry.heartbeat_status(agent_id)
                if status in ("lost", "merged"):
                    why = (
                        "was merged into a newer agent's of this device while it was silent "
                        "(paused, or cut off)"
                        if status == "merged"
                        else "is gone (Redis lost its data?)"
                    )
                    log.warning(
                        "agent %s: its registry record %s; registering again", agent_id, why
                    )
                    info = device_info(self.device_class, self.runtime.name, self.threads)
                    registry.restore(agent_id, info)
            except redis.RedisError as error:
                # Said once per outage: the serving loop says how long it lasts.
                if not failing:
                    log.warning("heartbeat failed (%s); retrying", error)
                failing = True
                continue
            failing = False
            # A deletion told by the Redis the agent has just left is not this agent's.
            if status == "deleted" and registry is self.registry:
                self.deleted.set()
                return


def register_via_api(
    api_url: str, info: dict[str, Any], *, timeout_s: float = 10, source: str = "--api"
) -> dict[str, Any]:
    """Register this device with the Archtree API; return its answer (`id`, `redis_url`, ...).
    `source`: where `api_url` came from (--api, or ARCHTREE_API_URL), which errors name.

    ServiceUnreachable when the API cannot be reached or answers that it cannot serve for now
    (502, 503, 504); ArchtreeError for an answer that waiting will not change.
    """
    api_url = checked_api_url(api_url, source)
    url = f"{api_url}/v1/devices"
    try:
        response = httpx.post(url, json=info, timeout=timeout_s)
    except httpx.TransportError as error:
        plain = plain_http_instead(error, api_url)
        if plain is not None:  # waiting will not help
            raise ArchtreeError(
                f"cannot speak https with the Archtree API at {api_url} ({error}): it may "
                f"speak plain http; give {source} {plain}"
            ) from None
        raise ServiceUnreachable(
            f"the Archtree API at {api_url} cannot be reached ({type(error).__name__}: {error}); "
            f"start it with `archtree up` or check {source}"
        ) from None
    except httpx.HTTPError as error:  # an answer that cannot be read: redirects, encoding
        raise ArchtreeError(
            f"the Archtree API at {api_url} answered in a way this agent cannot read "
            f"({type(error).__name__}: {error}); check {source}"
        ) from None
    if response.status_code in UNAVAILABLE_STATUSES:
        raise ServiceUnreachable(
            f"the Archtree API at {api_url} cannot register this device now "
            f"(HTTP {response.status_code}: {response.text[:200].strip()}); check that the "
            "service and its Redis are up"
        )
    # A proxy in front of a stopped API may answer 502-504 in HTML: that is waited for above.
    if "json" not in response.headers.get("content-type", ""):
        kind = response.headers.get("content-type", "no content type").split(";")[0]
        raise ArchtreeError(
            f"{api_url} is not an Archtree API: it answered HTTP {response.status_code} with "
            f"{kind}, not JSON, to POST /v1/devices; check {source}"
        )
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except (ValueError, AttributeError):
            detail = None
        said = detail if isinstance(detail, str) else response.text[:200].strip()
        fix = without_v1(api_url, source) if response.status_code == 404 else None
        raise ArchtreeError(
            f"the Archtree API at {api_url} refused to register this device "
            f"(HTTP {response.status_code}: {said}){f'; {fix}' if fix else ''}"
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "id" not in answer or "redis_url" not in answer:
        raise ArchtreeError(
            f"{url} did not answer with a device id and redis_url: is {api_url} an Archtree API?"
        )
    return answer


def agent_start_wait_s() -> float:
    """How long an agent waits at its start for an API or a Redis that is not up yet:
    $ARCHTREE_AGENT_START_WAIT_S, else DEFAULT_START_WAIT_S (60)."""
    return seconds_from_environment(START_WAIT_VARIABLE, DEFAULT_START_WAIT_S, zero_allowed=True)


def service_from_environment() -> tuple[str | None, str | None]:
    """(API URL, Redis URL) for an agent given neither: $ARCHTREE_API_URL, else
    $ARCHTREE_REDIS_URL or $REDIS_URL. The API comes first, as the Redis address it hands out
    follows the service when it moves."""
    api_url = os.environ.get("ARCHTREE_API_URL", "").strip()
    if api_url:
        return api_url, None
    redis_url = (os.environ.get("ARCHTREE_REDIS_URL") or os.environ.get("REDIS_URL") or "").strip()
    return None, redis_url or None


def when_reachable(attempt: Callable[[], T], deadline: float) -> T:
    """`attempt()`, tried again while it raises ServiceUnreachable until `deadline`
    (time.monotonic()), after which that error is raised; says once that it waits."""
    waiting = False
    while True:
        try:
            return attempt()
        except ServiceUnreachable as error:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise
            if not waiting:
                log.warning(
                    "waiting up to %.0f s (%s) for the service: %s",
                    left_s,
                    START_WAIT_VARIABLE,
                    error,
                )
                waiting = True
            time.sleep(min(RECONNECT_WAIT_S, left_s))


def ping_redis(client: redis.Redis, redis_url: str) -> None:
    """Check that `client` reaches Redis: ServiceUnreachable while it cannot connect,
    ArchtreeError for a refusal (a wrong password, a database that does not exist)."""
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as error:
        raise ArchtreeError(
            f"Redis at {redacted(redis_url)} refused this agent ({error}); check the URL's "
            "credentials"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise ServiceUnreachable(
            f"cannot reach Redis at {redacted(redis_url)} ({error}); check that the service is up"
        ) from None
    except redis.RedisError as error:
        raise ArchtreeError(
            f"Redis at {redacted(redis_url)} cannot serve this agent ({error})"
        ) from None


def _reached_redis(redis_url: str, deadline: float) -> redis.Redis:
    """A client of the Redis at `redis_url`, once it answers (waited for until `deadline`)."""
    try:
        check_redis_url(redis_url)
        client = redis_client(redis_url)
    except ValueError as error:  # redis-py names the schemes it takes
        raise ArchtreeError(
            f"cannot use {redacted(redis_url)!r} as the Redis URL ({error}): give one like "
            "redis://HOST:6379/0 with --redis-url, or only --api to use the API's"
        ) from None
    when_reachable(lambda: ping_redis(client, redis_url), deadline)
    return client


def agent_main(
    api_url: str | None,
    device_class: str,
    runtime: str = "torch",
    threads: int = 1,
    redis_url: str | None = None,
    *,
    claim_idle_ms: int = 30000,
    block_ms: int = 1000,
    heartbeat_s: float = 3.0,
    settings: TimingSettings | None = None,
    allowed_modules: Sequence[str] = (),
    start_wait_s: float | None = None,
) -> int:
    """Register this device (through the API, or in Redis directly when only `redis_url` is
    given) and serve requests until SIGINT or SIGTERM; return the exit status.

    Given neither `api_url` nor `redis_url`, they come from the environment (see
    `service_from_environment`). An API or a Redis that cannot be reached yet is waited for,
    up to `start_wait_s` in all (default: `agent_start_wait_s()`); a refusal fails at once.
    At exit the device is marked offline (its record stays, with its measurement count). The
    agent also stops, returning 0, when its registry record is deleted, so that a supervisor that
    restarts failed processes does not bring a deleted device back.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    get_runtime(runtime)
    check_threads(threads)
    api_source = "--api"
    if api_url is None and redis_url is None:
        api_url, redis_url = service_from_environment()
        api_source = "ARCHTREE_API_URL"
    if api_url is None and redis_url is None:
        raise ArchtreeError(
            "give the API URL (--api URL, or ARCHTREE_API_URL) so the agent can register, or "
            "the service's Redis (--redis-url URL, or ARCHTREE_REDIS_URL)"
        )
    if api_url is not None:
        api_url = checked_api_url(api_url, api_source)
    deadline = time.monotonic() + (
        start_wait_s if start_wait_s is not None else agent_start_wait_s()
    )
    info = device_info(device_class, runtime, threads)
    answer: dict[str, Any] | None = None
    register_again: Callable[[], tuple[str, str]] | None = None
    # A Redis given is reached before registering, so that a wrong one leaves no device behind.
    client = _reached_redis(redis_url, deadline) if redis_url is not None else None
    if api_url is not None:
        registered_at = api_url
        answer = when_reachable(
            lambda: register_via_api(registered_at, info, source=api_source), deadline
        )
        if redis_url is None:
            redis_url = str(answer["redis_url"])
            client = _reached_redis(redis_url, deadline)

            def register_again() -> tuple[str, str]:
                again = register_via_api(registered_at, info, source=api_source)
                return str(again["id"]), str(again["redis_url"])

    assert client is not None
    registry = DeviceRegistry(client)
    agent_id = str(answer["id"]) if answer is not None else registry.register(info)["id"]
    agent = MeasurementAgent(
        client,
        device_class,
        runtime=runtime,
        threads=threads,
        agent_id=agent_id,
        claim_idle_ms=claim_idle_ms,
        block_ms=block_ms,
        heartbeat_s=heartbeat_s,
        registry=registry,
        settings=settings,
        allowed_modules=allowed_modules,
        register_again=register_again,
    )
    stop = threading.Event()
    stopped_by: list[str] = []

    def stop_on(signum: int, _frame: object) -> None:
        stopped_by.append(signal.Signals(signum).name)
        stop.set()

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, stop_on) for signum in signals}
    try:
        agent.run(stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        agent.client.close()
    if stopped_by:
        log.warning(
            "agent %s stopped (%s): its device shows offline %s",
            agent.agent_id,
            stopped_by[0],
            "now" if agent.said_offline else "once its heartbeats stop",
        )
    return 0
