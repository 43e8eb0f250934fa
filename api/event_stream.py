"""A job's event stream as Server-Sent Events: replayed after Last-Event-ID, then live."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import FrameType
from typing import Annotated, Any

import anyio
from fastapi import Header, HTTPException
from fastapi.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import header_as_sent, quoted
from api.spec_terms import event_in_spec_terms
from workers.job_store import FINAL_STATUSES, REDIS_UNREACHABLE, JobStore
from workers.task_leases import TaskLeases

POLL_S = 0.25
# A job's final status is written just before its `status` event: once the job has ended,
# the stream waits this long for that event before it gives up on it.
END_GRACE_S = 2.0
# While Redis cannot be reached, a stream asks again every REDIS_RETRY_S, for REDIS_GRACE_S.
REDIS_RETRY_S = 1.0
REDIS_GRACE_S = 60.0
# How often a stream looks for tasks whose worker was lost.
LEASE_CHECK_S = 2.0
# A Redis stream id: milliseconds, optionally a sequence number, each a 64-bit unsigned integer.
_STREAM_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")
_STREAM_ID_PART_MAX = 2**64 - 1
# Set once this process is told to stop (SIGTERM, SIGINT): the open streams end at their next
# turn, and their clients resume them from their last event id on the API that serves next.
# Left open, they would hold the server's graceful stop up until its timeout cut them, with an
# error and a traceback for each. A threading.Event, as a signal handler sets it.
STOPPING = threading.Event()
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class _EndingStreams:
    """A stop signal's handler: sets STOPPING, then does what the server's handler does."""

    server_handler: Callable[[int, FrameType | None], Any]

    def __call__(self, number: int, frame: FrameType | None) -> None:
        STOPPING.set()
        self.server_handler(number, frame)


def end_streams_on_stop() -> None:
    """Have a stop signal to this process end its streams, besides stopping its server.

    Each process of the API (`archtree api --workers N` runs N) does so as its app starts (its
    lifespan), over the handler its server put in place for the signal by then (uvicorn's,
    which stops taking requests and waits for the open ones to end). Only in the main thread,
    which takes signals, and only over a handler in Python: a signal left to its default still
    ends the process as before."""
    if threading.current_thread() is not threading.main_thread():
        return
    for number in _STOP_SIGNALS:
        handler = signal.getsignal(number)
        if callable(handler) and not isinstance(handler, _EndingStreams):
            signal.signal(number, _EndingStreams(handler))


async def _pause(seconds: float) -> None:
    """Sleep `seconds`, in turns of POLL_S at most, ending at the next once the process stops."""
    deadline = time.monotonic() + seconds
    while not STOPPING.is_set() and (left := deadline - time.monotonic()) > 0:
        await anyio.sleep(min(left, POLL_S))


def start_after(
    last_event_id: Annotated[
        str | None,
        Header(
            description="Resume after this event id (sent by EventSource on reconnect).",
            json_schema_extra={"pattern": f"^{_STREAM_ID.pattern}$"},
        ),
    ] = None,
) -> str:
    """The stream id to read after: the client's Last-Event-ID, or the beginning.

    A dependency of the events route, so that a bad id is refused (422) before the stream's
    200 headers are sent.
    """
    if not last_event_id:
        return "0-0"
    if not _STREAM_ID.fullmatch(last_event_id) or any(
        int(part) > _STREAM_ID_PART_MAX for part in last_event_id.split("-")
    ):
        raise HTTPException(
            status_code=422,
            detail=f"Last-Event-ID {quoted(header_as_sent(last_event_id))} is not an event id "
            "of this API (like 1732660000000-0): send the id of the last event received, or none",
        )
    return last_event_id


async def job_events(
    jobs: JobStore, job_id: str, after: str, leases: TaskLeases
) -> AsyncIterator[ServerSentEvent]:
    """The job's events after `after`, following new ones until the job has ended, their
    texts in spec terms (`search.width`, not `--width`). While it runs, a task whose worker
    was lost is said in a `task_lost` event (added to the job's events, once). It ends early
    when the process is told to stop (see STOPPING)."""
    ended_at: float | None = None
    unreachable_since: float | None = None
    leases_checked = 0.0
    while not STOPPING.is_set():
        try:
            batch = await run_in_threadpool(jobs.read_events, job_id, after)
            job = None if batch else await run_in_threadpool(jobs.get, job_id)
            running = job is not None and job["status"] not in FINAL_STATUSES
            if running and time.monotonic() - leases_checked > LEASE_CHECK_S:
                leases_checked = time.monotonic()
                await run_in_threadpool(leases.announce_lost, jobs, job_id)
        except REDIS_UNREACHABLE:
            # Redis restarting: the stream waits for it (keep-alive pings go on meanwhile).
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > REDIS_GRACE_S:
                raise
            await _pause(REDIS_RETRY_S)
            continue
        unreachable_since = None
        for event_id, event in batch:
            after = event_id
            yield ServerSentEvent(
                data=event_in_spec_terms(event), event=event.get("kind"), id=event_id
            )
            if event.get("kind") == "status" and event.get("status") in FINAL_STATUSES:
                return
        if batch:
            continue
        if job is None or job["status"] in FINAL_STATUSES:
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > END_GRACE_S:
                return
        await _pause(POLL_S)
