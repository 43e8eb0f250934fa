"""The Celery app of the service: Redis as broker and result backend, JSON only.

Workers start with `archtree worker` (see `worker_main`) or
`python -m celery -A workers.celery_app worker -Q search,evaluate`, configured by the
ARCHTREE_* environment (archtree_cli.settings.ServiceSettings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery import Celery

from archtree_cli.settings import ServiceSettings, service_settings
from search.errors import ArchtreeError
from workers import redis_broker

START_JOB = "archtree.start_job"
RUN_DEPTH = "archtree.run_depth"
EVALUATE_CHILD = "archtree.evaluate_child"
ADVANCE_DEPTH = "archtree.advance_depth"
RETUNE_CANDIDATE = "archtree.retune_candidate"
FINISH_JOB = "archtree.finish_job"
ORCHESTRATION_TASKS = (START_JOB, RUN_DEPTH, ADVANCE_DEPTH, FINISH_JOB)


def restore_interval_s(visibility_s: float) -> int:
    """How often workers look for tasks whose visibility timeout has passed."""
    return max(1, min(10, round(visibility_s / 5)))


def restore_mutex_s(visibility_s: float) -> int:
    """How long the restore lock of a worker that died holding it keeps the others waiting."""
    return 3 * restore_interval_s(visibility_s)


def redelivery_s(settings: ServiceSettings) -> float:
    """At most how long after its delivery the task of a lost worker goes to another one."""
    return settings.visibility_timeout_s + restore_interval_s(settings.visibility_timeout_s)


def celery_config(settings: ServiceSettings) -> dict[str, Any]:
    """Celery settings derived from the service settings."""
    url = settings.celery_redis_url()
    visibility_s = settings.visibility_timeout_s
    routes = {name: {"queue": settings.search_queue} for name in ORCHESTRATION_TASKS}
    # Retuning a candidate is fine-tuning, as evaluating a child is: both spread over workers.
    routes[EVALUATE_CHILD] = {"queue": settings.evaluate_queue}
    routes[RETUNE_CANDIDATE] = {"queue": settings.evaluate_queue}
    config: dict[str, Any] = {
        # Pickle would let whoever can write to Redis run code in every worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acknowledged when it ends, so the tasks of a worker that died are handed
        # to another one once the visibility timeout has passed.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": visibility_s,
            # kombu looks for expired tasks every 10 x 10 s by default: far too late for
            # a short visibility timeout.
            "unacked_restore_interval": restore_interval_s(visibility_s),
            "unacked_restore_throttle": 1,
            # The lock a worker holds while it restores them: kombu keeps a lock left by a
            # worker killed while holding it for 5 minutes, and no task of a lost worker goes
            # back meanwhile. A restore takes milliseconds, and two at once restore each task
            # once (each restore is a transaction on the task).
            "unacked_mutex_expire": restore_mutex_s(visibility_s),
        },
        "broker_connection_retry_on_startup": True,
        "task_routes": routes,
        "task_default_queue": settings.search_queue,
    }
    if url:
        config.update(broker_url=url, result_backend=url)
    return config


def create_app(
    settings: ServiceSettings | None = None, *, publish_timeout_s: float | None = None
) -> Celery:
    """A Celery app for these settings; the tasks are those of workers.tasks, and its workers
    hand back lost tasks (workers.lost_task_sweeper).

    `publish_timeout_s`: how long sending a task waits on a Redis that does not answer (a
    stalled one takes the connection and answers nothing) before kombu's OperationalError:
    three such waits at most, as the send is tried once more after reconnecting. Without it
    a send waits until Redis answers again, as a worker's may: a request of the API must not.
    """
    redis_broker.install()
    app = Celery("archtree", include=["workers.tasks", "workers.lost_task_sweeper"])
    config = celery_config(settings or service_settings())
    if publish_timeout_s is not None:
        config["broker_transport_options"] = {
            **config["broker_transport_options"],
            "socket_timeout": publish_timeout_s,
            "socket_connect_timeout": publish_timeout_s,
        }
        # Celery's default tries 4 times: a send to a stalled Redis would wait 4 timeouts.
        config["task_publish_retry_policy"] = {
            "max_retries": PUBLISH_RETRIES,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        }
    app.conf.update(config)
    return app


# Times a send that failed (a connection Redis closed as it restarted) is tried again.
PUBLISH_RETRIES = 1


app = create_app()


# Tasks one worker runs at once, each in a process of its own (hundreds of MB each): far
# above what any one machine runs well, a typo (1000) fails at once instead of taking the
# machine's memory.
MAX_CONCURRENCY = 64


def worker_main(
    queues: Sequence[str] | None = None,
    concurrency: int = 1,
    *,
    hostname: str | None = None,
    loglevel: str = "INFO",
) -> None:
    """Run a Celery worker of this service in this process until it is stopped.

    `queues` defaults to both the search queue (orchestration, light) and the evaluate queue
    (child evaluations: pruning, fine-tuning). A worker on a GPU machine may serve only the
    evaluate queue. `concurrency` is the number of tasks run at once (one process each);
    `hostname` names the worker (Celery's `-n`, e.g. `w1@%h`). Redis comes from
    ARCHTREE_REDIS_URL (or REDIS_URL), files from ARCHTREE_ARTIFACTS_URL.
    """
    settings = service_settings()
    if not settings.resolved_redis_url():
        raise ArchtreeError(
            "a worker needs Redis: set ARCHTREE_REDIS_URL (e.g. redis://host:6379/0) to the "
            "same Redis as the API"
        )
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ArchtreeError(
            f"worker concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}: each "
            "task runs in a process of its own, with its own copy of torch and the model"
        )
    known = (settings.search_queue, settings.evaluate_queue)
    queues = [queue.strip() for queue in queues or known if queue.strip()] or list(known)
    unknown = [queue for queue in queues if queue not in known]
    if unknown:
        raise ArchtreeError(
            f"--queues: no queue {', '.join(map(repr, unknown))}; this service's queues are "
            f"{' and '.join(known)} (ARCHTREE_SEARCH_QUEUE, ARCHTREE_EVALUATE_QUEUE)"
        )
    argv = ["worker", "-Q", ",".join(queues), "-c", str(concurrency), "--loglevel", loglevel]
    if hostname:
        argv += ["-n", hostname]
    app.worker_main(argv)
