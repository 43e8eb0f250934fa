"""Redis clients that reconnect on their own after Redis restarts.

A client made by `redis.Redis.from_url` has no retry: after a restart, the first command on
each pooled connection fails with "Connection closed by server" although Redis is back. These
clients retry a command that met a closed or refused connection, a few times within about a
second, so a restart is invisible to whoever arrives after it; a Redis that stays down still
fails fast.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

RETRIES = 2
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
RETRIED_ERRORS = [redis.ConnectionError, redis.TimeoutError]


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client for `url` (options as for `redis.Redis.from_url`) that retries over a reconnect."""
    return redis.Redis.from_url(
        url, retry=Retry(_backoff(), RETRIES), retry_on_error=RETRIED_ERRORS, **options
    )


def async_redis_client(url: str, **options: Any) -> redis.asyncio.Redis:
    """The asyncio counterpart of `redis_client`."""
    return redis.asyncio.Redis.from_url(
        url,
        retry=redis.asyncio.retry.Retry(_backoff(), RETRIES),
        retry_on_error=RETRIED_ERRORS,
        **options,
    )
