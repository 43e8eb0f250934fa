"""Redis clients that reconnect on their own after Redis restarts.

A client made by `redis.Redis.from_url` has no retry: after a restart, the first command on
each pooled connection fails with "Connection closed by server" although Redis is back. These
clients retry a command that met a closed or refused connection, a few times within about a
second, so a restart is invisible to whoever arrives after it; a Redis that stays down still
fails fast.
"""

from __future__ import annotations

import inspect
import os
import socket
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.connection
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

RETRIES = 2
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 0.5
RETRIED_ERRORS = [redis.ConnectionError, redis.TimeoutError]
# What a client that must answer quickly retries: a reconnect, not a Redis that stalls (each
# retry would wait out its socket timeout again).
RECONNECT_ERRORS = [redis.ConnectionError]


def _backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(base=BACKOFF_BASE_S, cap=BACKOFF_CAP_S)


def redis_client(url: str, *, retry_timeouts: bool = True, **options: Any) -> redis.Redis:
    """A client for `url` (options as for `redis.Redis.from_url`) that retries over a reconnect,
    and after a timeout unless `retry_timeouts` is off."""
    retried = RETRIED_ERRORS if retry_timeouts else RECONNECT_ERRORS
    # Retry's own default retries timeouts too: it is told exactly which errors to retry.
    return redis.Redis.from_url(
        url,
        retry=Retry(_backoff(), RETRIES, supported_errors=tuple(retried)),
        retry_on_error=retried,
        **options,
    )


def async_redis_client(
    url: str, *, retry_timeouts: bool = True, **options: Any
) -> redis.asyncio.Redis:
    """The asyncio counterpart of `redis_client`."""
    retried = RETRIED_ERRORS if retry_timeouts else RECONNECT_ERRORS
    return redis.asyncio.Redis.from_url(
        url,
        retry=redis.asyncio.retry.Retry(_backoff(), RETRIES, supported_errors=tuple(retried)),
        retry_on_error=retried,
        **options,
    )


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
_SOCKET_SCHEMES = ("unix", "redis+socket")


def check_redis_url(url: str) -> None:
    """ValueError unless `url` is empty or a Redis URL redis-py and Celery take: a host for
    redis:// and rediss://, a socket path for unix://, a port in range, query options that
    redis-py's connections take (an unknown one fails only at the first command, as a
    TypeError) with values it can read. The message shows the URL without its password."""
    if not url:
        return
    shown = redacted(url)
    if url != url.strip():  # urlsplit drops leading spaces, which redis-py refuses
        raise ValueError(f"{shown!r} has spaces around it: give the URL alone")
    parts = urlsplit(url)
    try:
        _ = parts.port
    except ValueError as error:
        reason = "out of range (1-65535)" if "range" in str(error) else "not a number"
        raise ValueError(f"the port of {shown!r} is {reason}") from None
    if parts.scheme in _SOCKET_SCHEMES:
        complete = bool(parts.path)
    else:
        complete = parts.scheme in REDIS_SCHEMES and bool(parts.hostname)
    if not complete:
        raise ValueError(
            f"{shown!r} is not a Redis URL: give one like redis://HOST:6379/0 (or rediss://, "
            "unix:///path/to/socket)"
        )
    database = parts.path.strip("/") if parts.scheme not in _SOCKET_SCHEMES else ""
    if database and not database.isdigit():
        raise ValueError(
            f"{shown!r} names database {database!r}: a Redis database is a number, as in "
            "redis://HOST:6379/0"
        )
    _check_options(url, parts.scheme, shown)


def _check_options(url: str, scheme: str, shown: str) -> None:
    """ValueError for a query option the connections of `scheme` do not take, or a value
    redis-py cannot read (`?socket_timeout=abc`)."""
    if not urlsplit(url).query:
        return
    if scheme in _SOCKET_SCHEMES:
        url = "unix://" + url.removeprefix(scheme + "://")
    try:
        options = redis.connection.parse_url(url)
    except ValueError as error:  # "Invalid value for 'socket_timeout' in connection URL."
        raise ValueError(f"{shown!r}: {error}") from None
    connection_class = options.get("connection_class", redis.connection.Connection)
    taken = _parameters(redis.connection.ConnectionPool) | _parameters(connection_class)
    # parse_qs as redis-py reads the query: an option without a value is left out.
    unknown = [name for name in parse_qs(urlsplit(url).query) if name not in taken]
    if not unknown:
        return
    tls = any(name == "ssl" or name.startswith("ssl_") for name in unknown)
    if tls and scheme != "rediss":
        fix = "for TLS, give rediss:// instead"
    else:
        fix = "leave it out" if len(unknown) == 1 else "leave them out"
    raise ValueError(
        f"{shown!r} has {'an option' if len(unknown) == 1 else 'options'} that Redis "
        f"connections do not take: {', '.join(unknown)} ({fix})"
    )


def _parameters(cls: type) -> set[str]:
    """The keyword arguments `cls(...)` takes by name: those of its __init__ and, while one
    passes on **kwargs, of its base classes' (which it hands them to)."""
    names: set[str] = set()
    for base in cls.__mro__:
        if "__init__" not in vars(base) or base is object:
            continue
        parameters = inspect.signature(base.__init__).parameters.values()
        names.update(
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        )
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names - {"self"}


def redacted(url: str) -> str:
    """`url` with its password, if any, shown as ***: for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# How long a rediss:// Redis is given to complete a TLS handshake, and one that did not to
# answer in plain Redis.
TLS_PROBE_S = 1.0


def speaks_plain_redis_only(redis_url: str) -> bool:
    """Whether `redis_url` is rediss:// and its server speaks plain Redis: the TLS handshake
    fails, or hangs (a plain Redis waits for the end of a command line that never comes, and
    redis-py waits that out as a timeout, 3 times 5 s, then as an outage), and the server
    answers a plain PING. Anything else (nothing listens, TLS works, neither answers): False,
    left to the connection's own errors."""
    parts = urlsplit(redis_url)
    if parts.scheme != "rediss" or not parts.hostname:
        return False
    address = (parts.hostname, parts.port or 6379)
    return not _tls_handshake_completes(address) and _answers_plain_redis(address)


def plain_redis_for_tls(redis_url: str, named: str) -> str | None:
    """What to say, at once, of a rediss:// `redis_url` whose server speaks plain Redis (see
    `speaks_plain_redis_only`; waiting will not make it speak TLS), the Redis `named` so;
    None for any other."""
    if not speaks_plain_redis_only(redis_url):
        return None
    plain = "redis" + redacted(redis_url).removeprefix("rediss")
    return (
        f"Redis at {named} does not speak TLS: it answered in plain Redis; give {plain} "
        "instead, or turn TLS on in that Redis"
    )


def redis_url_variable() -> str:
    """The variable a Redis URL from the environment was read from: ARCHTREE_REDIS_URL, else
    REDIS_URL."""
    return "ARCHTREE_REDIS_URL" if os.environ.get("ARCHTREE_REDIS_URL") else "REDIS_URL"


def _tls_handshake_completes(address: tuple[str, int]) -> bool:
    """Whether a TLS handshake with `address` completes within TLS_PROBE_S; also True when
    nothing could be connected to there (then there is nothing to tell about TLS)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # whether it speaks TLS, not whom to trust
    try:
        connection = socket.create_connection(address, timeout=TLS_PROBE_S)
    except OSError:
        return True
    try:
        with context.wrap_socket(connection, server_hostname=address[0]):
            return True
    except (OSError, ssl.SSLError):  # socket.timeout is an OSError
        return False
    finally:
        connection.close()


def _answers_plain_redis(address: tuple[str, int]) -> bool:
    """Whether `address` answers a plain-text PING as Redis does (+PONG, or an error such as
    -NOAUTH)."""
    try:
        with socket.create_connection(address, timeout=TLS_PROBE_S) as connection:
            connection.sendall(b"PING\r\n")
            answer = connection.recv(256)
    except OSError:
        return False
    return answer[:1] in (b"+", b"-") and answer.endswith(b"\r\n")
