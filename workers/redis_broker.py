"""kombu's Redis transport as the workers use it, with the messages a worker holds kept safe
when Redis restarts under it.

A worker holds the messages it took and has not acknowledged (tasks acknowledged late, and
the countdown retries of jobs waiting for their device). When its connection to Redis breaks,
Celery closes the connection, and kombu's channel puts those messages back on their queue. In
kombu 5.7 the connection's transport is already detached by then, so building the Redis
client for that restore raises AttributeError ('NoneType' object has no attribute
'hostname'): not a connection error, so the worker exits with "Unrecoverable error". Had the
restore run, Redis would have been down for it anyway.

`QoS` leaves such messages in kombu's unacknowledged hash in Redis, where nothing is lost, and
says so in one warning. Those scheduled for later (a countdown, an ETA) are not running and
Celery forgets their timers with the old connection: the worker puts them back on their queue
as soon as Redis answers on the new one. The others may still be running in a pool process,
so they go back only after the visibility timeout, as those of a lost worker do.

kombu picks the channel's QoS class by the URL's scheme (redis://, rediss://, a unix socket),
and Celery's broker_transport setting is overridden by a redis+socket:// URL, so `install`
sets the class on kombu's Redis channel itself (see its docstring).
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from time import time
from typing import Any

import kombu
from kombu.transport import redis as kombu_redis

log = logging.getLogger("archtree.worker")

# Delivery tags whose messages a closed connection left in Redis, with when: the channel that
# held them is gone, so the next channel of this process restores them.
_left_behind: dict[str, float] = {}
_left_behind_lock = threading.Lock()


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS that tolerates restoring over a connection that is already closed."""

    def restore_unacked(self, client: Any = None) -> None:
        if self.channel.connection.client is None:
            self._leave_behind("the broker connection was already closed")
            return
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors as error:
            self._leave_behind(f"Redis is unreachable ({error})")

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        self._restore_left_behind()
        super().restore_visible(*args, **kwargs)

    def _leave_behind(self, reason: str) -> None:
        now = time()
        scheduled = [
            tag for tag, message in self._delivered.items() if _scheduled_after(message, now)
        ]
        count = len(self._delivered)
        self._delivered.clear()
        with _left_behind_lock:
            _left_behind.update((tag, now) for tag in scheduled)
        log.warning(
            "%d unacknowledged message(s) stay in Redis (%s): the %d scheduled for later go "
            "back to their queue once Redis answers, the others after the visibility timeout "
            "(%s s)",
            count,
            reason,
            len(scheduled),
            self.visibility_timeout,
        )

    def _restore_left_behind(self) -> None:
        """Put back on their queue the messages left behind that no one took since: under
        kombu's restore mutex, a message still held from before it was left behind."""
        with _left_behind_lock:
            pending = dict(_left_behind)
        if not pending:
            return
        restored = 0
        with self.channel.conn_or_acquire() as client:
            try:
                with kombu_redis.Mutex(client, self.unacked_mutex_key, self.unacked_mutex_expire):
                    for tag, left_at in pending.items():
                        delivered_at = client.zscore(self.unacked_index_key, tag)
                        if delivered_at is not None and delivered_at <= left_at:
                            self.restore_by_tag(tag, client)
                            restored += 1
            except kombu_redis.MutexHeld:
                return  # another worker is restoring: try again on the next sweep
        with _left_behind_lock:
            for tag in pending:
                _left_behind.pop(tag, None)
        log.info("%d message(s) left in Redis as it went away are back on their queue", restored)


def _scheduled_after(message: Any, now: float) -> bool:
    """Whether a Celery message has an ETA (or countdown) after `now`: not started yet."""
    eta = (message.headers or {}).get("eta")
    if not eta:
        return False
    try:
        when = datetime.fromisoformat(eta)
    except (TypeError, ValueError):
        return False
    if when.tzinfo is None:  # Celery sends naive ETAs in UTC
        when = when.replace(tzinfo=UTC)
    return when.timestamp() > now


def install() -> None:
    """Make kombu's Redis channels (all of redis://, rediss:// and unix sockets) use `QoS`.

    Checked against kombu 5.x, whose Redis channel builds its QoS from `Channel.QoS` and
    restores on close through `QoS.restore_unacked(client)`; another kombu keeps its own.
    """
    if kombu_redis.Channel.QoS is QoS:
        return
    if kombu.VERSION[0] != 5 or kombu_redis.Channel.QoS is not kombu_redis.QoS:
        log.warning(
            "kombu %s: the workers' Redis restart handling is not installed", kombu.__version__
        )
        return
    kombu_redis.Channel.QoS = QoS
