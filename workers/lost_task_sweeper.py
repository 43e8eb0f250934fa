"""Each worker looks for the tasks of workers that died and hands them back to their queue,
without waiting for the broker's visibility timeout (workers/task_leases.py says how).

A thread of the worker's main process, started when the worker is ready and stopped when it
shuts down: every third of a lease it runs `TaskLeases.redeliver_lost`, one Redis script.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery.signals import worker_ready, worker_shutdown

from archtree_cli.settings import service_settings
from latency.redis_connection import redis_client
from workers.job_store import REDIS_UNREACHABLE
from workers.task_leases import TaskLeases

log = logging.getLogger("archtree.worker")

_stop = threading.Event()


def sweep_until(stop: threading.Event, leases: TaskLeases) -> None:
    """Hand back lost tasks every `leases.sweep_every_s` until `stop` is set; a Redis that
    cannot be reached is asked again at the next sweep."""
    while not stop.wait(leases.sweep_every_s):
        try:
            handed_back = leases.redeliver_lost()
        except REDIS_UNREACHABLE as error:
            log.debug("lost tasks not looked for (%s): again at the next sweep", error)
            continue
        for task_id in handed_back:
            log.warning(
                "task %s: its worker stopped renewing its lease; handed back to its queue, "
                "for another worker",
                task_id,
            )


@worker_ready.connect
def _start_sweeping(**_: Any) -> None:
    settings = service_settings()
    leases = TaskLeases.of(redis_client(settings.resolved_redis_url()), settings)
    _stop.clear()
    threading.Thread(
        target=sweep_until, args=(_stop, leases), name="lost-task-sweeper", daemon=True
    ).start()


@worker_shutdown.connect
def _stop_sweeping(**_: Any) -> None:
    _stop.set()
