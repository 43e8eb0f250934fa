"""Each worker looks for the tasks of workers that died and hands them back to their queue,
without waiting for the broker's visibility timeout (workers/task_leases.py and
workers/task_holders.py say how).

A thread of the worker's main process, started when the worker is ready and stopped when it
shuts down: every third of a lease it says the worker is alive and runs
`TaskLeases.redeliver_lost` and `TaskHolders.redeliver_orphaned`, a Redis script each. The
same process records each task it receives, as it receives it, with the job it belongs to.

A task handed back is said in the worker's log, and in its job's events: a lost running
task's `task_lost` event is added by the job's readers, who see its lease gone (once, when the
first sees it); one handed back because the worker that received it is gone has none to see,
so the sweep that hands it back adds the same event.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
import threading
import time
from typing import Any

from celery.signals import task_received, worker_ready, worker_shutdown

from archtree_cli.settings import service_settings
from latency.redis_connection import redis_client
from workers.job_store import FINAL_STATUSES, REDIS_UNREACHABLE, JobStore
from workers.task_holders import OrphanedTask, TaskHolders
from workers.task_leases import LostTask, TaskLeases

log = logging.getLogger("archtree.worker")

# How long recording a received task waits on a Redis that does not answer: the worker's
# consumer waits meanwhile (and a task left unrecorded goes back as it did before).
RECORD_TIMEOUT_S = 5.0

# This process's own token: a worker is known as its name and the token, so that a worker
# started again under the same name (by a service manager, or the next `archtree up`) does
# not pass for the one that died holding tasks.
_INSTANCE = secrets.token_hex(6)

_stop = threading.Event()


def holder_name(hostname: str) -> str:
    """How this worker process, named `hostname`, is known among the tasks' holders."""
    return f"{hostname}#{_INSTANCE}"


def sweep_until(
    stop: threading.Event, leases: TaskLeases, holders: TaskHolders, worker: str
) -> None:
    """Say `worker` is alive and hand back lost tasks every `leases.sweep_every_s` until
    `stop` is set; a Redis that cannot be reached is asked again at the next sweep."""
    while True:
        try:
            holders.alive(worker)
            lost = leases.redeliver_lost()
            orphaned = holders.redeliver_orphaned(leases.running_key)
        except REDIS_UNREACHABLE as error:
            log.debug("lost tasks not looked for (%s): again at the next sweep", error)
            lost, orphaned = [], []
        for task_id in lost:
            log.warning(
                "task %s: its worker stopped renewing its lease; handed back to its queue, "
                "for another worker",
                task_id,
            )
        for task in orphaned:
            log.warning(
                "task %s: the worker that received it is gone; handed back to its queue, "
                "for another worker",
                task.task_id,
            )
            tell_its_job(leases, task)
        if stop.wait(leases.sweep_every_s):
            return


def tell_its_job(leases: TaskLeases, task: OrphanedTask) -> None:
    """Add a `task_lost` event to the job of a task handed back as orphaned, as the job's
    readers do for a running task whose lease is gone: by when another worker takes it is
    kombu's next look for expired messages. A job that has ended, or is gone, is not told."""
    if task.job_id is None:
        return
    lost = LostTask(
        task_id=task.task_id,
        name=task.name,
        worker=task.worker,
        started_at=task.received_at if task.received_at is not None else time.time(),
        silent_s=task.silent_s,
        back_by=time.time() + leases.restore_s,
    )
    jobs = JobStore(leases.client, leases.prefix)
    try:
        job = jobs.get(task.job_id)
        if job is not None and job["status"] not in FINAL_STATUSES:  # nothing else to say
            jobs.append_event(task.job_id, "task_lost", lost.to_dict())
    except REDIS_UNREACHABLE as error:  # the task goes back all the same; the log says so
        log.debug("task %s: its job not told (%s)", task.task_id, error)


def job_of(request: Any) -> str | None:
    """The job id a received task's arguments carry (every task of a job takes `job_id`),
    or None where they carry none."""
    try:
        arguments = inspect.signature(request.task.run).bind(*request.args, **request.kwargs)
    except (AttributeError, TypeError, ValueError):
        return None
    job_id = arguments.arguments.get("job_id")
    return job_id if isinstance(job_id, str) else None


@functools.cache
def _leases_and_holders() -> tuple[TaskLeases, TaskHolders]:
    """Made on first use in the worker's main process (the pool's processes never use them)."""
    settings = service_settings()
    client = redis_client(
        settings.resolved_redis_url(),
        retry_timeouts=False,
        socket_timeout=RECORD_TIMEOUT_S,
        socket_connect_timeout=RECORD_TIMEOUT_S,
    )
    return TaskLeases.of(client, settings), TaskHolders(client, settings.task_lease_s)


@worker_ready.connect
def _start_sweeping(sender: Any = None, **_: Any) -> None:
    _stop.clear()
    threading.Thread(
        target=sweep_until,
        args=(_stop, *_leases_and_holders(), holder_name(sender.hostname)),
        name="lost-task-sweeper",
        daemon=True,
    ).start()


@task_received.connect
def _record_received(request: Any = None, **_: Any) -> None:
    try:
        _leases_and_holders()[1].received(
            request.id, holder_name(request.hostname), job_of(request), request.name
        )
    except REDIS_UNREACHABLE as error:  # the task goes back as it did before, if need be
        log.debug("task %s: its receipt not recorded (%s)", request.id, error)


@worker_shutdown.connect
def _stop_sweeping(**_: Any) -> None:
    _stop.set()
