"""Tasks a worker received but holds no lease on (killed before the task's step began, or
holding a task until its countdown): on a private Redis and a real kombu queue, one whose
worker dies goes back to its queue within about two leases, not the visibility timeout (an
hour here); one whose worker lives, or that runs under a lease, stays (a real worker's death
through `archtree up`: test_service)."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import redis

from tests.redis_fixtures import process_once_ready, wait_until
from workers.task_holders import OrphanedTask, TaskHolders
from workers.task_leases import TaskLeases

pytest_plugins = ["tests.redis_fixtures"]

LEASE_S = 0.4


def receiving_process(redis_url: str, prefix: str, task_id: str, worker: str, job_id: str):
    """A process that records it received `task_id` of job `job_id` and says it is alive
    until it is killed, as a worker's main process does; returned once it has recorded it."""
    return process_once_ready(
        "import sys, time, redis\n"
        "from workers.task_holders import TaskHolders\n"
        f"holders = TaskHolders(redis.Redis.from_url(sys.argv[1]), {LEASE_S}, {prefix!r})\n"
        f"holders.received({task_id!r}, {worker!r}, {job_id!r}, 'archtree.run_depth')\n"
        "print('received', flush=True)\n"
        "while True:\n"
        f"    holders.alive({worker!r})\n"
        f"    time.sleep({LEASE_S / 3})\n",
        redis_url,
        "received",
    )


@contextmanager
def taken_message(redis_url: str) -> Iterator[tuple[object, str]]:
    """A message of a real kombu queue (visibility timeout: an hour), handed out and not
    acknowledged, as a worker holds a task it received; and its task id."""
    from kombu import Connection

    task_id = f"task-{uuid.uuid4()}"
    with Connection(redis_url, transport_options={"visibility_timeout": 3600}) as connection:
        queue = connection.SimpleQueue(f"queue-{uuid.uuid4()}")
        queue.put({"step": 1}, headers={"id": task_id})
        yield queue, task_id
        queue.close()


def test_a_received_task_whose_worker_dies_goes_back_to_its_queue(
    redis_client: redis.Redis, redis_url: str
):
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-a:")
    running_key = "holders-a:running_tasks"
    with taken_message(redis_url) as (queue, task_id):
        taken = queue.get(timeout=10)
        received_at = time.time()
        holder = receiving_process(redis_url, "holders-a:", task_id, "w1@host#a1", "job-a")
        try:
            deadline = time.monotonic() + 3 * LEASE_S
            while time.monotonic() < deadline:  # alive: left alone, whatever the sweeps
                assert holders.redeliver_orphaned(running_key) == []
                time.sleep(LEASE_S / 8)
        finally:
            holder.kill()
            holder.wait()
        killed_at = time.time()
        (handed_back,) = wait_until(
            lambda: holders.redeliver_orphaned(running_key), 10 * LEASE_S, "the task handed back"
        )
        # What its job is told: the task, its worker (the name, not the process's token),
        # when it was received and how long its worker has been silent.
        assert (handed_back.task_id, handed_back.job_id) == (task_id, "job-a")
        assert (handed_back.worker, handed_back.name) == ("w1@host", "archtree.run_depth")
        assert received_at <= handed_back.received_at <= killed_at
        assert 2 * LEASE_S <= handed_back.silent_s <= time.time() - killed_at + LEASE_S
        assert redis_client.zscore("unacked_index", taken.delivery_tag) == 0
        assert holders.redeliver_orphaned(running_key) == []  # once
        assert redis_client.hlen(holders.received_key) == 0
        queue.channel.qos.restore_visible()  # what every worker runs every few seconds
        again = queue.get(timeout=10)
        assert again.headers["id"] == task_id and again.payload == {"step": 1}
        again.ack()
        assert holders.redeliver_orphaned(running_key) == []


def test_a_dead_workers_task_that_runs_under_a_lease_is_left_to_the_lease(
    redis_client: redis.Redis, redis_url: str
):
    """A task that took its lease is a running task: its own lease says when it is lost."""
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-b:")
    leases = TaskLeases(redis_client, 30.0, redelivery_s=3600.0, prefix="holders-b:")
    with taken_message(redis_url) as (queue, task_id):
        queue.get(timeout=10)
        holders.received(task_id, "w2@host")  # and the worker is never said alive again
        with leases.hold("job1", task_id, "archtree.evaluate_child", "w2@host"):
            deadline = time.monotonic() + 4 * LEASE_S
            while time.monotonic() < deadline:
                assert holders.redeliver_orphaned(leases.running_key) == []
                time.sleep(LEASE_S / 8)
        # Its step over, the task holds no lease, and its message is still not acknowledged.
        handed_back = wait_until(
            lambda: holders.redeliver_orphaned(leases.running_key), 10 * LEASE_S, "handed back"
        )
        assert [task.task_id for task in handed_back] == [task_id]


def test_an_acknowledged_task_is_forgotten_and_never_handed_back(
    redis_client: redis.Redis, redis_url: str
):
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-c:")
    with taken_message(redis_url) as (queue, task_id):
        taken = queue.get(timeout=10)
        holders.received(task_id, "w3@host")
        taken.ack()
        assert holders.redeliver_orphaned("holders-c:running_tasks") == []
        assert redis_client.hlen(holders.received_key) == 0


def test_a_worker_that_could_not_say_it_lives_for_a_while_keeps_its_task(
    redis_client: redis.Redis, redis_url: str
):
    """A worker frozen (or kept from Redis) past its alive key's length says it lives again
    within a third of a lease once it can: the first sweep's mark is dropped."""
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-d:")
    running_key = "holders-d:running_tasks"
    with taken_message(redis_url) as (queue, task_id):
        taken = queue.get(timeout=10)
        holder = receiving_process(redis_url, "holders-d:", task_id, "w4@host", "job-d")
        try:
            os.kill(holder.pid, signal.SIGSTOP)
            wait_until(
                lambda: not redis_client.exists(holders.alive_key("w4@host")),
                10 * LEASE_S,
                "the alive key gone",
            )
            assert holders.redeliver_orphaned(running_key) == []  # seen orphaned: marked
            os.kill(holder.pid, signal.SIGCONT)
            wait_until(
                lambda: redis_client.exists(holders.alive_key("w4@host")),
                10 * LEASE_S,
                "alive again",
            )
            deadline = time.monotonic() + 3 * LEASE_S
            while time.monotonic() < deadline:  # a whole lease after the mark, and more
                assert holders.redeliver_orphaned(running_key) == []
                time.sleep(LEASE_S / 8)
            assert redis_client.zscore("unacked_index", taken.delivery_tag) > 0
        finally:
            holder.kill()
            holder.wait()
        taken.ack()


def test_a_task_its_lease_sweep_handed_back_is_not_handed_back_again(
    redis_client: redis.Redis, redis_url: str
):
    """A running task of a dead worker goes back through its lease; the holders' sweep that
    finds its message still waiting for kombu's restore neither marks it again nor says it."""
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-e:")
    with taken_message(redis_url) as (queue, task_id):
        taken = queue.get(timeout=10)
        holders.received(task_id, "w5@host")  # never said alive again: dead
        redis_client.zadd("unacked_index", {taken.delivery_tag: 0}, xx=True)  # handed back
        said: list[str] = []

        def forgotten() -> bool:
            said.extend(holders.redeliver_orphaned("holders-e:running_tasks"))
            return redis_client.hlen(holders.received_key) == 0

        wait_until(forgotten, 10 * LEASE_S, "the received task forgotten")
        assert said == []
        assert redis_client.hlen(holders.received_key) == 0
        queue.channel.qos.restore_visible()
        assert queue.get(timeout=10).headers["id"] == task_id


def test_a_task_an_earlier_release_recorded_goes_back_though_its_job_is_unknown(
    redis_client: redis.Redis, redis_url: str
):
    """Records of an earlier release held the holder's name alone."""
    holders = TaskHolders(redis_client, LEASE_S, prefix="holders-f:")
    with taken_message(redis_url) as (queue, task_id):
        taken = queue.get(timeout=10)
        redis_client.hset(holders.received_key, task_id, "w6@host#f6")  # never alive again
        (handed_back,) = wait_until(
            lambda: holders.redeliver_orphaned("holders-f:running_tasks"),
            10 * LEASE_S,
            "the task handed back",
        )
        assert (handed_back.task_id, handed_back.worker) == (task_id, "w6@host")
        assert handed_back.job_id is None and handed_back.received_at is None
        assert redis_client.zscore("unacked_index", taken.delivery_tag) == 0


def test_the_job_a_received_task_belongs_to_is_read_from_its_arguments():
    """Every task of a job takes `job_id`, in whatever place (a chord's callback after the
    results it collects); a message that carries none, or carries arguments its task does not
    take, has no job."""
    import workers.tasks  # noqa: F401  (registers the tasks)
    from workers.celery_app import ADVANCE_DEPTH, EVALUATE_CHILD, FINISH_JOB, START_JOB, app
    from workers.lost_task_sweeper import job_of

    def received(name: str, *args: object, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(task=app.tasks[name], args=list(args), kwargs=kwargs)

    assert job_of(received(START_JOB, "job-1")) == "job-1"
    assert job_of(received(EVALUATE_CHILD, "job-2", {"id": "n1"})) == "job-2"
    assert job_of(received(ADVANCE_DEPTH, [None, {"id": "n1"}], "job-3", 2)) == "job-3"
    assert job_of(received(FINISH_JOB, [], job_id="job-4")) == "job-4"
    assert job_of(received(START_JOB)) is None
    assert job_of(received(START_JOB, "job-5", "extra")) is None
    assert job_of(received(START_JOB, 5)) is None
    assert job_of(SimpleNamespace(args=[], kwargs={})) is None  # no task


def test_the_job_of_a_task_handed_back_is_told_unless_it_has_ended_or_is_gone(
    redis_client: redis.Redis,
):
    """The sweep that hands a task back adds a `task_lost` event to its job, as its readers
    add for a running task: to a job that runs, not to one that ended or was deleted (whose
    events would be left behind)."""
    from workers.job_store import JobStore
    from workers.lost_task_sweeper import tell_its_job

    jobs = JobStore(redis_client, prefix="holders-g:")
    leases = TaskLeases(redis_client, 3.0, redelivery_s=3600.0, prefix="holders-g:")
    running = jobs.create({"model": "builtin:vgg"})
    ended = jobs.create({"model": "builtin:vgg"})
    jobs.set_status(ended, "cancelled")

    def handed_back(job_id: str) -> OrphanedTask:
        return OrphanedTask(f"t-{job_id}", "w7@host#g7", job_id, "archtree.run_depth", 5.0, 9.0)

    before = time.time()
    for job_id in (running, ended, "gone"):
        tell_its_job(leases, handed_back(job_id))

    def lost(job_id: str) -> list[dict]:
        return [event for _id, event in jobs.read_events(job_id) if event["kind"] == "task_lost"]

    (said,) = lost(running)
    assert said["task_id"] == f"t-{running}"
    assert (said["worker"], said["name"]) == ("w7@host", "archtree.run_depth")
    assert (said["started_at"], said["silent_s"]) == (5.0, 9.0)
    assert before + leases.restore_s <= said["back_by"] <= time.time() + leases.restore_s
    assert lost(ended) == []
    assert not redis_client.exists("holders-g:job:gone:events")
