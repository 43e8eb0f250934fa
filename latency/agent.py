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

SIGINT and SIGTERM stop an agent (see AgentStopSignals): at once while it waits, holding no
request; once it has answered the measurement under way, or at once on a second signal, the
request it held then handed back to the other agents of its class.

Runtimes plug in through `latency.runtimes.RUNTIMES`: each names its version and makes timers,
which are LatencyOracle objects for one (batch size, dtype).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import httpx
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from archtree_cli.client import checked_api_url, plain_http_instead, without_v1
from archtree_cli.environment import seconds_from_environment
from archtree_cli.stop_signals import importing
from latency.device_registry import AGENT_HEARTBEAT_S, DeviceRegistry
from latency.fingerprint import cpu_model
from latency.harness import TimingSettings
from latency.local_oracle import check_threads
from latency.measurement_protocol import (
    CONSUMER_GROUP,
    MeasurementReply,
    MeasurementRequest,
    ProtocolError,
    ensure_group,
    module_package,
    package_allowed,
    send_reply,
    stream_key,
    text,
    validate_device_class,
)
from latency.redis_connection import (
    check_redis_url,
    plain_redis_for_tls,
    redacted,
    redis_client,
    redis_url_variable,
)
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
# A stopping agent's goodbye (marking itself offline, handing back what it holds) gives each
# Redis command this long, and tries none twice: a Redis that does not answer must not hold
# the stop up (redis-py's defaults would wait 5 s a try, thrice).
GOODBYE_TIMEOUT_S = 1.0
# How long a stopping agent waits for its heartbeat thread, which may be inside a Redis command.
HEARTBEAT_JOIN_S = 1.0
# The idle time a handed-back request is given: beyond any agent's claim_idle_ms, so that the
# next claim pass of another agent of the class (every few seconds) takes it.
HANDED_BACK_IDLE_MS = 24 * 3600 * 1000
# A consumer of the class's group that holds no request and has been idle this long is taken
# for an agent's that died (kill -9, a lost machine): an agent's claim pass removes it from the
# group (see MeasurementAgent._remove_dead_consumers).
DEAD_CONSUMER_IDLE_MS = 3600 * 1000
# KEYS[1]: the stream; ARGV: the group, the consumer to keep (the caller), the idle time in ms
# beyond which a consumer holding nothing is removed. The names removed.
REMOVE_DEAD_CONSUMERS = """
local removed = {}
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local field = {}
  for i = 1, #consumer, 2 do field[consumer[i]] = consumer[i + 1] end
  if field['name'] ~= ARGV[2] and field['pending'] == 0
      and field['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field['name'])
    removed[#removed + 1] = field['name']
  end
end
return removed
"""
# The turns in which the agent's main thread sleeps while a stop signal may come.
PAUSE_TURN_S = 0.05

T = TypeVar("T")


class ServiceUnreachable(ArchtreeError):
    """The API or Redis cannot be reached, or not serve, for now: waiting may heal it."""


class StopNow(KeyboardInterrupt):
    """Raised in the agent's main thread by its stop signal handler, where stopping at once is
    what the signal asks: the first signal while the agent waits holding no request, a second
    one whatever it does (the measurement under way is cut short). A KeyboardInterrupt, so that
    what cleans up after Ctrl-C (the timing child is stopped) does so."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class AgentStopSignals:
    """SIGINT and SIGTERM for an agent, handled without taking any lock.

    A signal handler runs in the main thread, between two of its bytecodes. One that takes a
    lock waits forever when the code it interrupted holds that lock: threading.Event.set()
    takes the event's, which the main thread's own Event.wait() holds at moments of each wait,
    so a handler that set the agent's stop event while the agent waited on it (every second of
    a Redis outage) could hang the agent for good. Logging takes locks too, and writing to
    stderr from a handler can meet the interrupted write. So `handle` only appends the signal's
    name to a list, writes a byte to a pipe and, where stopping at once loses nothing (`at_once`,
    set by the agent while it waits holding no request, or a second signal), raises StopNow.
    A thread of its own reads the pipe: it says at once that the agent stops once it has
    answered the measurement under way, when it is timing one, and sets `stop`, the Event the
    agent's other threads may watch (never set by the handler).

    The main thread never waits on an Event or a Condition while a handler may raise there:
    an exception raised inside their wait() can leave their lock released twice or held for
    good. Its waits are sleeps in short turns (`pause`), socket reads and the timing child's
    pipe; `calm` defers the raise while it starts a thread (Thread.start waits on an Event).

    Install in the main thread with `installed()`. At the end, `close()` puts the previous
    handlers back; an agent stopped by a signal keeps these instead (`leaving`), so that a
    further Ctrl-C, as the process exits with code 0, changes nothing.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        # The signals received, in order: appended to by the handler alone.
        self.names: list[str] = []
        # Whether a first signal stops the agent at once (set by the main thread).
        self.at_once = True
        # Set once the agent says goodbye, which no signal cuts short (it is bounded).
        self.leaving = False
        # Set while the main thread is where a StopNow must not be raised (see the class).
        self.calm = False
        # The agent's id, and the request it is timing (None while none), for what is said.
        self.agent_id: Callable[[], str | None] = lambda: None
        self.measuring: Callable[[], str | None] = lambda: None
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._previous: dict[int, Any] = {}
        self._watcher = threading.Thread(target=self._watch, name="agent-stop-signals", daemon=True)

    @classmethod
    def installed(cls) -> AgentStopSignals | None:
        """Handlers of SIGINT and SIGTERM, with their thread started; None outside the main
        thread (tests call agent_main there), where no handler can be installed."""
        if threading.current_thread() is not threading.main_thread():
            return None
        signals = cls()
        signals._watcher.start()
        signals._previous = {
            signum: signal.signal(signum, signals.handle)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        return signals

    def close(self) -> None:
        """Put the previous handlers back, and end the thread."""
        self.leaving = True
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        os.close(self._write)  # the thread reads the end of the pipe, and returns
        self._watcher.join()
        os.close(self._read)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The handler: no lock, no logging, no Event (see the class)."""
        self.names.append(signal.Signals(signum).name)
        with contextlib.suppress(OSError):  # a full pipe has woken the thread already
            os.write(self._write, b"s")
        # Never in the middle of an import, which could leave a module half-loaded: the stop
        # is then taken at the next check.
        wanted = self.at_once or len(self.names) > 1
        if wanted and not (self.leaving or self.calm or importing(frame)):
            raise StopNow(self.names[-1])

    def check(self) -> None:
        """StopNow if a signal has come: for the main thread, where it may stop at once."""
        if self.names and not self.leaving:
            raise StopNow(self.names[-1])

    def pause(self, seconds: float) -> None:
        """Sleep `seconds` in the main thread, unless a signal comes: then StopNow (raised by
        the handler, or at the next turn after one it deferred)."""
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return
            time.sleep(min(PAUSE_TURN_S, left_s))

    def _watch(self) -> None:
        said = False
        while os.read(self._read, 64):
            if not said and self.names:
                said = True
                under_way = None if self.leaving or self.at_once else self.measuring()
                if under_way is not None:
                    log.warning(
                        "agent %s: %s: stopping once the measurement under way is answered "
                        "(Ctrl-C again stops now)",
                        self.agent_id(),
                        self.names[0],
                    )
            self.stop.set()


@dataclass
class RedisOutage:
    """Since when the agent's Redis has been unreachable, and when to ask the API again."""

    since: float
    next_ask: float
    ask_wait_s: float = ASK_API_AFTER_S
    # When the outage is next said again in the log (it is said when it starts).
    next_said: float = 0.0


def device_info(
    device_class: str,
    runtime: str = "torch",
    threads: int = 1,
    allowed_modules: Sequence[str] = (),
) -> dict[str, Any]:
    """What an agent registers: device class, host, runtime and version, cpu, gpu, threads,
    and the packages it builds `module:` sources of."""

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
        "allowed_modules": sorted(set(allowed_modules)),
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
        heartbeat_s: float = AGENT_HEARTBEAT_S,
        registry: DeviceRegistry | None = None,
        settings: TimingSettings | None = None,
        allowed_modules: Sequence[str] = (),
        register_again: Callable[[], tuple[str, str]] | None = None,
        dead_consumer_idle_ms: int = DEAD_CONSUMER_IDLE_MS,
    ) -> None:
        self.runtime = get_runtime(runtime)
        self.client = client
        self.device_class = validate_device_class(device_class)
        self.threads = threads
        self.agent_id = agent_id
        self.claim_idle_ms = claim_idle_ms
        self.dead_consumer_idle_ms = dead_consumer_idle_ms
        self._remove_dead = client.register_script(REMOVE_DEAD_CONSUMERS)
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
        # The stream entry of the request being served, while one is.
        self.under_way: str | None = None
        # Once stopped: the request whose measurement a second stop signal cut short, if one
        # was, and the requests handed back to the other agents of the class (None: could not).
        self.cut_short: str | None = None
        self.handed_back: list[str] | None = []
        # The stop signals of the process, when `run` serves in its main thread.
        self.signals: AgentStopSignals | None = None
        self._stream = stream_key(device_class)
        self._timers: OrderedDict[tuple[int, str], LatencyOracle] = OrderedDict()
        # Held while the agent moves to another Redis, so that the heartbeat thread reads a
        # registry and an id of the same place.
        self._moving = threading.Lock()

    def run(self, stop: threading.Event, signals: AgentStopSignals | None = None) -> None:
        """Serve requests until `stop` is set or the agent's registry record is deleted.

        With `signals` (the process's, `run` in its main thread) also until a stop signal:
        at once while the agent waits holding no request, else once it has answered the
        request it serves, or at once on a second signal (StopNow)."""
        self.signals = signals
        if self.agent_id is None:
            info = device_info(
                self.device_class, self.runtime.name, self.threads, self.allowed_modules
            )
            self.agent_id = self.registry.register(info)["id"]
        halt = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat_loop, args=(halt,), name="agent-heartbeat", daemon=True
        )
        try:
            with self._waiting():
                ensure_group(self.client, self.device_class)
            if signals is not None:
                signals.calm = True
            try:
                heartbeat.start()
            finally:
                if signals is not None:
                    signals.calm = False
            log.info("agent %s serving device class %s", self.agent_id, self.device_class)
            self._serve_until(stop)
        except StopNow:
            self.cut_short = self.under_way
        finally:
            if signals is not None:
                signals.leaving = True
            halt.set()
            if heartbeat.is_alive():  # bounded: it may wait on a Redis that does not answer
                heartbeat.join(HEARTBEAT_JOIN_S)
        if self.deleted.is_set():
            log.warning("agent %s was deleted from the device registry; stopping", self.agent_id)
        else:
            self._say_goodbye()

    def _stop_asked(self, stop: threading.Event) -> bool:
        return stop.is_set() or (self.signals is not None and bool(self.signals.names))

    def _serve_until(self, stop: threading.Event) -> None:
        claim_every_s = min(max(self.claim_idle_ms / 2000, 0.05), 5.0)
        next_claim = 0.0
        outage: RedisOutage | None = None
        while not self._stop_asked(stop) and not self.deleted.is_set():
            self.under_way = None
            try:
                if time.monotonic() >= next_claim:
                    # Claimed one: more may be waiting, look again right away.
                    next_claim = 0.0 if self.claim_stale() else time.monotonic() + claim_every_s
                if self._stop_asked(stop):
                    break  # asked while it answered a claimed request
                self.handle_one()
                if outage is not None:
                    log.warning("Redis answers again after %.0f s", time.monotonic() - outage.since)
                outage = None
            except (redis.ConnectionError, redis.TimeoutError) as error:
                # A request whose answer could not be sent stays pending, to be handed back.
                self.under_way = None
                with self._waiting():
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
                    if self.signals is not None:
                        self.signals.pause(RECONNECT_WAIT_S)
                    else:
                        stop.wait(RECONNECT_WAIT_S)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    raise
                # The stream was deleted (e.g. FLUSHDB): start over with a new group.
                with self._waiting():
                    ensure_group(self.client, self.device_class)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """A wait in which the agent holds no request: a stop signal ends it at once. (A
        request that Redis handed over as the signal came stays pending to the agent, and is
        handed back when it says goodbye.)"""
        signals = self.signals
        if signals is None:
            yield
            return
        signals.at_once = True
        try:
            signals.check()  # a signal that came just before
            yield
        finally:
            signals.at_once = False

    def _say_goodbye(self) -> None:
        """Mark the device offline in the registry now, so that jobs and `archtree submit`
        do not count on it while its heartbeats take `heartbeat_ttl_s` to go stale; then hand
        back the requests it holds (see `_hand_back`). Each command is given
        GOODBYE_TIMEOUT_S, once: a Redis that does not answer does not hold the stop up."""
        with self._moving:
            client, agent_id = self.client, self._consumer()
        pool = client.connection_pool
        brief = redis.Redis(
            connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class,
                **{
                    **pool.connection_kwargs,
                    "socket_timeout": GOODBYE_TIMEOUT_S,
                    "socket_connect_timeout": GOODBYE_TIMEOUT_S,
                    "retry": Retry(NoBackoff(), 0),
                    "retry_on_error": [],
                },
            )
        )
        marked = False
        self.handed_back = None
        try:
            self.said_offline = DeviceRegistry(brief).stop(agent_id)
            marked = True
            self.handed_back = self._hand_back(brief)
        except redis.RedisError as error:
            if marked:
                log.warning(
                    "agent %s could not hand back the requests it holds (%s): other agents of "
                    "its class take them once unanswered for %g s",
                    agent_id,
                    error,
                    self.claim_idle_ms / 1000,
                )
            else:
                log.warning("could not mark agent %s offline (%s)", agent_id, error)
        finally:
            brief.close()

    def _hand_back(self, client: redis.Redis) -> list[str]:
        """Give the requests this agent holds unanswered (one it was timing when a second stop
        signal came, one Redis handed over as the first came) back to the other agents of its
        class: each is made idle for long, so that their next claim pass takes it, without
        counting this delivery among those that MAX_DELIVERIES limits. Their ids."""
        try:
            pending = client.xpending_range(
                self._stream, CONSUMER_GROUP, "-", "+", 100, consumername=self._consumer()
            )
        except redis.ResponseError as error:
            if "NOGROUP" in str(error):
                return []  # the stream is gone, and what it held with it
            raise
        if not pending:
            # Nothing held: the stopped agent leaves the group's list of consumers too (a
            # consumer holding requests stays, for another agent to claim them from).
            client.xgroup_delconsumer(self._stream, CONSUMER_GROUP, self._consumer())
            return []
        with client.pipeline(transaction=False) as pipe:
            for entry in pending:
                pipe.xclaim(
                    self._stream,
                    CONSUMER_GROUP,
                    self._consumer(),
                    0,
                    [entry["message_id"]],
                    idle=HANDED_BACK_IDLE_MS,
                    retrycount=max(int(entry["times_delivered"]) - 1, 0),
                    justid=True,
                )
            pipe.execute()
        return [str(text(entry["message_id"])) for entry in pending]

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
        with self._waiting():
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
        """Take over one request left unacknowledged longer than `claim_idle_ms`, or drop one
        such entry whose request was deleted; else remove the consumers of dead agents from
        the group (see `_remove_dead_consumers`). Whether it took or dropped one: more may
        be waiting."""
        with self._waiting():
            _, messages, *_ = self.client.xautoclaim(
                self._stream, CONSUMER_GROUP, self._consumer(), self.claim_idle_ms, "0-0", count=1
            )
        for entry_id, fields in messages:
            if fields is None:
                # Deleted by its requester, who no longer waits for it. Redis 7 drops such an
                # entry from the pending list itself; Redis 6.2 (the one `archtree up` embeds)
                # hands it over as a nil, without even its id, and keeps it pending, now to
                # this agent: claimed again and again, and its holder never let go of.
                self._drop_deleted()
                return True
            entry_id = str(text(entry_id))
            self.claimed += 1
            log.info(
                "claimed request %s, left unanswered by another agent (it died, or was stopped "
                "at once)",
                entry_id,
            )
            if self._deliveries(entry_id) > MAX_DELIVERIES:
                self._answer_unsafe(entry_id, fields)
            else:
                self._serve(entry_id, fields)
            return True
        self._remove_dead_consumers()
        return False

    def _drop_deleted(self) -> None:
        """Acknowledge the entries pending to this agent whose request was deleted: they hold
        nothing to answer. (Between requests, as claim passes run, the agent holds no other.)"""
        with self._waiting():
            pending = self.client.xpending_range(
                self._stream, CONSUMER_GROUP, "-", "+", 100, consumername=self._consumer()
            )
            for entry in pending:
                entry_id = entry["message_id"]
                if not self.client.xrange(self._stream, entry_id, entry_id, count=1):
                    self.client.xack(self._stream, CONSUMER_GROUP, entry_id)

    def _remove_dead_consumers(self) -> None:
        """Remove from the group the consumers, other than this agent's, that hold no request
        and have been idle longer than `dead_consumer_idle_ms`: chiefly those of agents killed
        without their goodbye (which removes a stopped agent's consumer), listed forever else.

        Safe for a live agent: on Redis 7.2 and later each XREADGROUP it waits in keeps its idle
        time short; before 7.2 a read that finds nothing leaves it growing, so a live agent
        idle that long may be removed, but its consumer is created again by the XREADGROUP
        that hands it its next request, even one blocked as it was removed. The check and the
        removal are one script, so no request is handed to a consumer between them."""
        with self._waiting():
            removed = self._remove_dead(
                client=self.client,
                keys=[self._stream],
                args=[CONSUMER_GROUP, self._consumer(), self.dead_consumer_idle_ms],
            )
        for name in removed:
            log.info(
                "removed consumer %s from the group of device class %s: it held no request "
                "and was idle for over %g s (its agent died, or waits for requests)",
                text(name),
                self.device_class,
                self.dead_consumer_idle_ms / 1000,
            )

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
        self.under_way = entry_id
        try:
            request = MeasurementRequest.from_fields(fields)
        except ProtocolError as error:
            reply_to = text(fields.get(b"reply_to", fields.get("reply_to")))
            request_id = text(fields.get(b"request_id", fields.get("request_id"))) or "?"
            log.warning("malformed request %s: %s", entry_id, error)
            if reply_to:
                self._reply(reply_to, request_id, error=f"malformed request: {error}")
            self._ack(entry_id)
            self.under_way = None
            return
        started = time.perf_counter()
        try:
            result = self._measure(request)
        # Whatever one request does wrong (bad spec, model that cannot be built, OOM in
        # torch), the agent answers with the error and goes on serving.
        except Exception as error:
            if self.signals is not None and self.signals.names:
                # Failed after a stop signal, it may have failed of it: a SIGTERM to the
                # process group (`archtree up` stopping, systemd) ends the timing child too,
                # and code may turn a StopNow into another error (an import does). Handed
                # back, not answered: another agent times it, or gives the error again.
                raise StopNow(self.signals.names[-1]) from None
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
        self.under_way = None

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
        package = module_package(source)
        if package is not None and not package_allowed(package, self.allowed_modules):
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
                    info = device_info(
                        self.device_class, self.runtime.name, self.threads, self.allowed_modules
                    )
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
        if isinstance(error, httpx.RemoteProtocolError | httpx.ReadError) and speaks_redis(url):
            host_port = httpx.URL(api_url).netloc.decode()
            raise ArchtreeError(
                f"{api_url} is a Redis server, not the Archtree API: give {source} the API's "
                f"address (as `archtree up` prints it), or serve from this Redis with "
                f"--redis-url redis://{host_port}/0"
            ) from None
        v1 = without_v1(api_url, source)
        raise ServiceUnreachable(
            f"the Archtree API at {api_url} cannot be reached ({type(error).__name__}: {error}); "
            f"start it with `archtree up` or check {source}{f' ({v1})' if v1 else ''}"
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


def speaks_redis(url: str, timeout_s: float = 2.0) -> bool:
    """Whether the server at `url`'s host and port answers a Redis PING (with PONG, or by
    asking for a password): an address given as the API's that Redis holds closes on HTTP,
    which would otherwise be waited for as an API not up yet."""
    address = httpx.URL(url)
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        with socket.create_connection((address.host, port), timeout=timeout_s) as connection:
            connection.sendall(b"PING\r\n")
            answer = connection.recv(64)
    except OSError:
        return False
    return answer.startswith((b"+PONG", b"-NOAUTH", b"-WRONGPASS"))


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


# Where the Redis URL of an agent came from, for its messages: --redis-url, a variable, or
# the API's answer to its registration.
FROM_THE_API = "the API"


def _redis_url_fix(source: str) -> str:
    """How to give another Redis URL than the one from `source`."""
    if source == "--redis-url":
        return "give one like redis://HOST:6379/0 with --redis-url, or only --api to use the API's"
    if source == FROM_THE_API:
        return (
            "the API hands out its ARCHTREE_AGENT_REDIS_URL, else its ARCHTREE_REDIS_URL: fix "
            "that, or give this agent --redis-url"
        )
    return (
        f"set {source} to one like redis://HOST:6379/0, or give --api (or set "
        "ARCHTREE_API_URL) to use the API's"
    )


def _named(redis_url: str, source: str) -> str:
    """The Redis URL for a message, with where it came from unless that was --redis-url."""
    shown = redacted(redis_url)
    if source == "--redis-url":
        return shown
    return f"{shown} (from {'the API' if source == FROM_THE_API else source})"


def when_reachable(
    attempt: Callable[[], T], deadline: float, pause: Callable[[float], None] = time.sleep
) -> T:
    """`attempt()`, tried again while it raises ServiceUnreachable until `deadline`
    (time.monotonic()), after which that error is raised; says once that it waits. Between
    tries it calls `pause(seconds)` (which a stop signal may end)."""
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
            pause(min(RECONNECT_WAIT_S, left_s))


def ping_redis(client: redis.Redis, redis_url: str, source: str = "--redis-url") -> None:
    """Check that `client` reaches Redis: ServiceUnreachable while it cannot connect,
    ArchtreeError for a refusal (a wrong password, a database that does not exist) or for a
    rediss:// Redis that speaks plain Redis, not TLS (see `refuse_plain_redis_for_tls`)."""
    refuse_plain_redis_for_tls(redis_url, source)
    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as error:
        raise ArchtreeError(
            f"Redis at {_named(redis_url, source)} refused this agent ({error}); check the "
            "URL's credentials"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise ServiceUnreachable(
            f"cannot reach Redis at {_named(redis_url, source)} ({error}); check that the "
            "service is up"
        ) from None
    except redis.RedisError as error:
        raise ArchtreeError(
            f"Redis at {_named(redis_url, source)} cannot serve this agent ({error})"
        ) from None


def refuse_plain_redis_for_tls(redis_url: str, source: str = "--redis-url") -> None:
    """ArchtreeError when `redis_url` is rediss:// and its server speaks plain Redis (see
    `plain_redis_for_tls`)."""
    said = plain_redis_for_tls(redis_url, _named(redis_url, source))
    if said is not None:
        raise ArchtreeError(said)


def _reached_redis(
    redis_url: str,
    deadline: float,
    source: str = "--redis-url",
    pause: Callable[[float], None] = time.sleep,
) -> redis.Redis:
    """A client of the Redis at `redis_url` (which came from `source`: --redis-url, a
    variable, or FROM_THE_API), once it answers (waited for until `deadline`)."""
    try:
        check_redis_url(redis_url)
        client = redis_client(redis_url)
    except ValueError as error:  # redis-py names the schemes it takes
        raise ArchtreeError(
            f"cannot use {redacted(redis_url)!r} as the Redis URL"
            f"{'' if source == '--redis-url' else f' from {source}'} ({error}): "
            f"{_redis_url_fix(source)}"
        ) from None
    when_reachable(lambda: ping_redis(client, redis_url, source), deadline, pause)
    return client


def _check_same_redis(
    client: redis.Redis, redis_url: str, agent_id: str, api_url: str, api_source: str
) -> None:
    """ArchtreeError unless the device the API registered as `agent_id` is in the Redis at
    `redis_url` (--redis-url): an agent that served from another Redis than the API's would
    write its record there, and stay offline for the service while its jobs wait. The record
    the API wrote is deleted through the API."""
    try:
        found = DeviceRegistry(client).get(agent_id) is not None
    except redis.RedisError as error:
        raise ArchtreeError(
            f"Redis at {redacted(redis_url)} cannot serve this agent ({error})"
        ) from None
    if found:
        return
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(f"{api_url}/v1/devices/{agent_id}", timeout=10)
    raise ArchtreeError(
        f"--redis-url names another Redis than the API's: the API at {api_url} ({api_source}) "
        f"registered this device as agent {agent_id} in its Redis, and {redacted(redis_url)} "
        "has no such agent; leave --redis-url out (the API tells the agent its Redis) or give "
        "the API's Redis"
    )


def agent_main(
    api_url: str | None,
    device_class: str,
    runtime: str = "torch",
    threads: int = 1,
    redis_url: str | None = None,
    *,
    claim_idle_ms: int = 30000,
    block_ms: int = 1000,
    heartbeat_s: float = AGENT_HEARTBEAT_S,
    settings: TimingSettings | None = None,
    allowed_modules: Sequence[str] = (),
    start_wait_s: float | None = None,
) -> int:
    """Register this device (through the API, or in Redis directly when only `redis_url` is
    given) and serve requests until SIGINT or SIGTERM; return the exit status.

    Given neither `api_url` nor `redis_url`, they come from the environment (see
    `service_from_environment`). An API or a Redis that cannot be reached yet is waited for,
    up to `start_wait_s` in all (default: `agent_start_wait_s()`); a refusal fails at once.
    SIGINT or SIGTERM stops the agent with status 0, from its start on (see AgentStopSignals).
    At exit the device is marked offline (its record stays, with its measurement count). The
    agent also stops, returning 0, when its registry record is deleted, so that a supervisor that
    restarts failed processes does not bring a deleted device back.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    get_runtime(runtime)
    check_threads(threads)
    api_source, redis_source = "--api", "--redis-url"
    if api_url is None and redis_url is None:
        api_url, redis_url = service_from_environment()
        api_source, redis_source = "ARCHTREE_API_URL", redis_url_variable()
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
    signals = AgentStopSignals.installed()
    agent: MeasurementAgent | None = None
    try:
        agent = _started_agent(
            api_url,
            api_source,
            redis_url,
            redis_source,
            deadline,
            signals,
            device_class,
            runtime,
            threads,
            claim_idle_ms=claim_idle_ms,
            block_ms=block_ms,
            heartbeat_s=heartbeat_s,
            settings=settings,
            allowed_modules=allowed_modules,
        )
        if signals is None:
            agent.run(threading.Event())
            return 0
        signals.agent_id = lambda: agent.agent_id if agent is not None else None
        signals.measuring = lambda: agent.under_way if agent is not None else None
        signals.at_once = False
        agent.run(signals.stop, signals)
    except StopNow as stopped:
        # Before it served, or at a moment `run` could not catch it in: only what it holds in
        # Redis, if anything, is left to say goodbye.
        if agent is not None and signals is not None:
            agent.cut_short = agent.under_way
            signals.leaving = True
            agent._say_goodbye()
        else:
            log.warning("agent stopped (%s) at its start, before it served", stopped.signal_name)
            return 0
    finally:
        if signals is not None:
            if signals.names:
                signals.leaving = True  # the process exits: a further signal changes nothing
            else:
                signals.close()
        if agent is not None:
            agent.client.close()
    if signals is not None and signals.names and not agent.deleted.is_set():
        _say_stopped(agent, signals.names)
    return 0


def _say_stopped(agent: MeasurementAgent, names: list[str]) -> None:
    """The line an agent stopped by a signal ends with."""
    offline = "now" if agent.said_offline else "once its heartbeats stop"
    if agent.cut_short is None:
        log.warning(
            "agent %s stopped (%s): its device shows offline %s", agent.agent_id, names[0], offline
        )
        return
    if agent.handed_back is not None and agent.cut_short in agent.handed_back:
        taken = "it goes back to the other agents of its class"
    else:
        taken = (
            "another agent of its class takes it over once it has waited "
            f"{agent.claim_idle_ms / 1000:g} s, as from an agent that died"
        )
    request = agent.cut_short
    if len(names) > 1:
        how = f"at once ({names[0]} then {names[1]}): the measurement of request {request} was"
        how += " cut short"
    else:  # a signal to the process group: the timing process got it too
        how = f"({names[0]}): the measurement of request {request} failed with the stop"
    log.warning(
        "agent %s stopped %s, and %s; its device shows offline %s",
        agent.agent_id,
        how,
        taken,
        offline,
    )


def _started_agent(
    api_url: str | None,
    api_source: str,
    redis_url: str | None,
    redis_source: str,
    deadline: float,
    signals: AgentStopSignals | None,
    device_class: str,
    runtime: str,
    threads: int,
    **options: Any,
) -> MeasurementAgent:
    """`agent_main`'s start: reach Redis and the API (waited for until `deadline`), register,
    and make the agent. With `signals`, a stop signal ends it at once (StopNow)."""
    pause = signals.pause if signals is not None else time.sleep
    info = device_info(device_class, runtime, threads, options.get("allowed_modules", ()))
    if signals is not None:
        signals.check()  # one that came while torch loaded
    answer: dict[str, Any] | None = None
    register_again: Callable[[], tuple[str, str]] | None = None
    # A Redis given is reached before registering, so that a wrong one leaves no device behind.
    client = (
        _reached_redis(redis_url, deadline, redis_source, pause) if redis_url is not None else None
    )
    if api_url is not None:
        registered_at = api_url
        answer = when_reachable(
            lambda: register_via_api(registered_at, info, source=api_source), deadline, pause
        )
        if client is not None:
            assert redis_url is not None
            _check_same_redis(client, redis_url, str(answer["id"]), api_url, api_source)
        else:
            redis_url = str(answer["redis_url"])
            client = _reached_redis(redis_url, deadline, FROM_THE_API, pause)

            def register_again() -> tuple[str, str]:
                again = register_via_api(registered_at, info, source=api_source)
                return str(again["id"]), str(again["redis_url"])

    assert client is not None
    registry = DeviceRegistry(client)
    agent_id = str(answer["id"]) if answer is not None else registry.register(info)["id"]
    return MeasurementAgent(
        client,
        device_class,
        runtime=runtime,
        threads=threads,
        agent_id=agent_id,
        registry=registry,
        register_again=register_again,
        **options,
    )
