"""The Redis protocol between latency oracles (in workers) and device agents.

Key names and message (de)serialisation live here and nowhere else.

- Requests: one Redis stream per device class, `archtree:measure:{device_class}`, read by the
  consumer group `agents` (consumer name = agent id). Agents of one class share the stream, so
  each request is timed by one of them; an entry left pending by a dead agent is claimed by
  another with XAUTOCLAIM. Fields are plain strings; architectures travel as spec JSON, never
  as a pickle.
- Replies: one Redis list per request (`reply_to`, usually `archtree:reply:{request_id}`),
  pushed with LPUSH and given a TTL, so a reply nobody waits for any more disappears. The
  oracle waits on it with BLPOP.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from search.errors import ArchtreeError

STREAM_PREFIX = "archtree:measure:"
REPLY_PREFIX = "archtree:reply:"
CONSUMER_GROUP = "agents"
REPLY_TTL_S = 900
KINDS = ("pair", "ref")

DEVICE_CLASS_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"
_DEVICE_CLASS = re.compile(DEVICE_CLASS_PATTERN)
# A package whose `module:` sources an agent builds (--allow-module): a dotted Python package
# name (mynets, mynets.models).
PACKAGE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def module_package(source: str) -> str | None:
    """The package a `module:package.module:callable` source imports; None for other sources."""
    prefix, _, rest = source.partition(":")
    return rest.partition(":")[0] if prefix == "module" else None


def package_allowed(package: str, allowed: Sequence[str]) -> bool:
    """Whether `package` is one of `allowed` or inside one of them."""
    return any(package == name or package.startswith(name + ".") for name in allowed)


class ProtocolError(ValueError):
    """A stream entry or reply that does not follow this protocol."""


def validate_device_class(device_class: str) -> str:
    """Return `device_class` if it is usable in key names, else raise ArchtreeError."""
    if not isinstance(device_class, str) or not _DEVICE_CLASS.fullmatch(device_class):
        text = device_class if isinstance(device_class, str) else str(device_class)
        shown = text if len(text) <= 64 else text[:61] + "..."  # a long one is not echoed whole
        raise ArchtreeError(
            f"invalid device class {shown!r}: use 1-64 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit (e.g. 'rpi4-cpu')"
        )
    return device_class


def stream_key(device_class: str) -> str:
    """The request stream of one device class."""
    return STREAM_PREFIX + validate_device_class(device_class)


def reply_key(request_id: str) -> str:
    """The default reply list of one request."""
    return REPLY_PREFIX + request_id


def text(value: bytes | str | None) -> str | None:
    """A Redis value as str, whether or not the client decodes responses."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value


def ensure_group(client: redis.Redis, device_class: str) -> None:
    """Create the stream and its consumer group if missing (idempotent).

    The group starts at id 0 so that requests sent before the first agent ever started are
    delivered too.
    """
    try:
        client.xgroup_create(stream_key(device_class), CONSUMER_GROUP, id="0", mkstream=True)
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def stream_id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """A stream id ("ms-seq") as a tuple that compares in stream order."""
    milliseconds, _, sequence = str(text(entry_id)).partition("-")
    return int(milliseconds), int(sequence or 0)


@dataclass(frozen=True)
class MeasurementRequest:
    """One timing request.

    `kind` is "pair" (candidate interleaved with reference) or "ref" (the reference alone;
    `candidate` then repeats the reference so every request has the same fields).
    """

    candidate: str
    reference: str
    kind: str = "pair"
    confirm: bool = False
    batch_size: int = 1
    dtype: str = "float32"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    reply_to: str = ""
    sent_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.reply_to:
            object.__setattr__(self, "reply_to", reply_key(self.request_id))

    def to_fields(self) -> dict[str, str]:
        return {
            "request_id": self.request_id,
            "kind": self.kind,
            "candidate": self.candidate,
            "reference": self.reference,
            "confirm": "1" if self.confirm else "0",
            "batch_size": str(self.batch_size),
            "dtype": self.dtype,
            "reply_to": self.reply_to,
            "sent_at": repr(self.sent_at),
        }

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> MeasurementRequest:
        """Parse a stream entry's fields; raise ProtocolError naming what is wrong."""
        values = {text(k): text(v) for k, v in fields.items()}
        missing = [
            name
            for name in ("request_id", "candidate", "reference", "reply_to")
            if not values.get(name)
        ]
        if missing:
            raise ProtocolError(f"request lacks {', '.join(missing)}")
        kind = values.get("kind") or "pair"
        if kind not in KINDS:
            raise ProtocolError(f"unknown request kind {kind!r}; expected one of {KINDS}")
        confirm = values.get("confirm", "0")
        if confirm not in ("0", "1"):
            raise ProtocolError(f"confirm must be '0' or '1', got {confirm!r}")
        try:
            batch_size = int(values.get("batch_size") or 1)
            sent_at = float(values.get("sent_at") or 0.0)
        except ValueError as error:
            raise ProtocolError(f"bad number in request: {error}") from None
        if batch_size < 1:
            raise ProtocolError(f"batch_size must be >= 1, got {batch_size}")
        return cls(
            candidate=str(values["candidate"]),
            reference=str(values["reference"]),
            kind=kind,
            confirm=confirm == "1",
            batch_size=batch_size,
            dtype=values.get("dtype") or "float32",
            request_id=str(values["request_id"]),
            reply_to=str(values["reply_to"]),
            sent_at=sent_at,
        )


@dataclass(frozen=True)
class MeasurementReply:
    """An agent's answer: a result or an error message.

    `result` is `LatencyMeasurement.to_dict()` for a "pair" request and
    `{"reference": TimingStats.to_dict(), "fingerprint": ...}` for a "ref" request. On the wire
    the result's keys sit at the top level beside request_id, agent_id and timing_s (seconds the
    agent spent timing); an error reply has `error` instead.
    """

    request_id: str
    agent_id: str
    result: dict[str, Any] | None = None
    error: str | None = None
    timing_s: float = 0.0

    def to_json(self) -> str:
        body: dict[str, Any] = dict(self.result or {})
        body.update(request_id=self.request_id, agent_id=self.agent_id, timing_s=self.timing_s)
        if self.error is not None:
            body["error"] = self.error
        return json.dumps(body, sort_keys=True)

    @classmethod
    def from_json(cls, payload: bytes | str) -> MeasurementReply:
        try:
            body = json.loads(payload)
            request_id = str(body.pop("request_id"))
            agent_id = str(body.pop("agent_id"))
            timing_s = float(body.pop("timing_s", 0.0))
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ProtocolError(f"malformed reply: {error!r}") from None
        error_message = body.pop("error", None)
        return cls(
            request_id=request_id,
            agent_id=agent_id,
            result=None if error_message is not None else body,
            error=None if error_message is None else str(error_message),
            timing_s=timing_s,
        )


def send_request(client: redis.Redis, device_class: str, request: MeasurementRequest) -> str:
    """Append `request` to its device class's stream; return the entry id."""
    ensure_group(client, device_class)
    return str(text(client.xadd(stream_key(device_class), request.to_fields())))


def send_reply(client: redis.Redis, reply_to: str, reply: MeasurementReply) -> None:
    """Push `reply` onto the requester's list and let the list expire if nobody reads it."""
    with client.pipeline(transaction=True) as pipe:
        pipe.lpush(reply_to, reply.to_json())
        pipe.expire(reply_to, REPLY_TTL_S)
        pipe.execute()
