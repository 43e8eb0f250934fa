"""Each worker looks for the tasks of workers that died and hands them back to their queue,
without waiting for the broker's visibility timeout (workers/task_leases.py and
workers/task_holders.py say how).

A thread of the worker's main process, started when the worker is ready and stopped when it
shuts down: every third of a lease it says the worker is alive and runs
`TaskLeases.redeliver_lost` and `TaskHolders.redeliver_orphaned`, a Redis script each. The
same process records each task it receives, as it receives it.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
from typing import Any

from celery.signals import task_received, worker_ready, worker_shutdown

from archtree_cli.settings import service_settings
from latency.redis_connection import redis_client
from workers.job_store import REDIS_UNREACHABLE
from workers.task_holders import TaskHolders
from workers.task_leases import TaskLeases

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
        for task_id in orphaned:
            log.warning(
                "task %s: the worker that received it is gone; handed back to its queue, "
                "for another worker",
                task_id,
            )
        if stop.wait(leases.sweep_every_s):
            return


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
        _leases_and_holders()[1].received(request.id, holder_name(request.hostname))
    except REDIS_UNREACHABLE as error:  # the task goes back as it did before, if need be
        log.debug("task %s: its receipt not recorded (%s)", request.id, error)


@worker_shutdown.connect
def _stop_sweeping(**_: Any) -> None:
    _stop.set()
