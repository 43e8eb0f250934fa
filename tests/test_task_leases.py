"""Task leases on a private Redis: a task that runs keeps its lease however long it takes;
one whose process dies is lost within the lease's length (real worker deaths: test_workers,
test_service and test_dashboard)."""

from __future__ import annotations

import threading
import time
import uuid

import redis

from tests.redis_fixtures import process_once_ready, wait_until
from workers.job_store import JobStore
from workers.task_leases import TaskLeases

pytest_plugins = ["tests.redis_fixtures"]

LEASE_S = 0.4


def test_a_task_longer_than_its_lease_keeps_it_and_leaves_no_record(redis_client: redis.Redis):
    leases = TaskLeases(redis_client, LEASE_S, redelivery_s=30.0, prefix="leases-a:")
    with leases.hold("job1", "task-1", "archtree.evaluate_child", "w1@host"):
        deadline = time.monotonic() + 4 * LEASE_S
        while time.monotonic() < deadline:
            assert leases.lost("job1") == []
            time.sleep(LEASE_S / 8)
        assert redis_client.hlen(leases.tasks_key("job1")) == 1
    assert redis_client.exists(leases.tasks_key("job1"), leases.lease_key("job1", "task-1")) == 0


def holding_process(redis_url: str, prefix: str, job_id: str, task_id: str, name: str):
    """A process that holds the lease of `task_id` of `job_id` until it is killed, as a
    worker's does while it runs the task; returned once it holds it."""
    return process_once_ready(
        "import sys, time, redis\n"
        "from workers.task_leases import TaskLeases\n"
        f"leases = TaskLeases(redis.Redis.from_url(sys.argv[1]), {LEASE_S}, 30.0, "
        f"prefix={prefix!r})\n"
        f"with leases.hold({job_id!r}, {task_id!r}, {name!r}, 'w2@host'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n",
        redis_url,
        "held",
    )


def test_a_task_whose_process_dies_is_lost_and_announced_once(
    redis_client: redis.Redis, redis_url: str
):
    leases = TaskLeases(redis_client, LEASE_S, redelivery_s=30.0, prefix="leases-b:")
    jobs = JobStore(redis_client, prefix="leases-b:")
    holder = holding_process(redis_url, "leases-b:", "job2", "task-2", "archtree.run_depth")
    try:
        assert leases.lost("job2") == []
        holder.kill()
        holder.wait()
        (lost,) = wait_until(lambda: leases.lost("job2"), 10 * LEASE_S, "the lost task")
    finally:
        holder.kill()
    assert (lost.task_id, lost.name, lost.worker) == ("task-2", "archtree.run_depth", "w2@host")
    assert lost.silent_s >= LEASE_S
    # A live worker hands it back sooner than the broker's visibility timeout (30 s) would.
    assert lost.started_at + leases.handed_back_after_s <= lost.back_by < lost.started_at + 30.0
    assert [t.task_id for t in leases.announce_lost(jobs, "job2")] == ["task-2"]
    assert [t.task_id for t in leases.announce_lost(jobs, "job2")] == ["task-2"]
    said = [event for _, event in jobs.read_events("job2") if event["kind"] == "task_lost"]
    assert [(event["task_id"], event["worker"]) for event in said] == [("task-2", "w2@host")]


def test_a_task_that_ends_while_its_job_is_read_is_never_taken_for_lost(
    redis_client: redis.Redis,
):
    """A task's record and lease go together when it ends; one read of the job between the
    two must not see the record without its lease (tasks that wait for a device end and start
    again every few seconds)."""
    leases = TaskLeases(redis_client, 30.0, redelivery_s=30.0, prefix="leases-c:")
    stop = threading.Event()

    def tasks_coming_and_going() -> None:
        while not stop.is_set():
            with leases.hold("job3", "task-3", "archtree.evaluate_child", "w3@host"):
                pass

    churn = threading.Thread(target=tasks_coming_and_going)
    churn.start()
    try:
        seen = [leases.lost("job3") for _ in range(3000)]
    finally:
        stop.set()
        churn.join()
    assert [lost for lost in seen if lost] == []
    assert redis_client.exists(leases.tasks_key("job3")) == 0


def test_a_task_lost_a_whole_lease_after_a_sweep_saw_it_so_goes_back_to_its_queue(
    redis_client: redis.Redis, redis_url: str
):
    """Its message, taken from a real kombu queue and not acknowledged, is marked expired in
    kombu's index, and kombu's own look for expired messages puts it back on the queue, long
    before the visibility timeout (an hour here)."""
    from kombu import Connection

    task_id, queue_name = f"task-{uuid.uuid4()}", f"queue-{uuid.uuid4()}"
    leases = TaskLeases(redis_client, LEASE_S, redelivery_s=3600.0, prefix="leases-d:")
    with Connection(redis_url, transport_options={"visibility_timeout": 3600}) as connection:
        queue = connection.SimpleQueue(queue_name)
        queue.put({"step": 1}, headers={"id": task_id})
        taken = queue.get(timeout=10)  # handed out, not acknowledged: as a running task's
        holder = holding_process(redis_url, "leases-d:", "job4", task_id, "archtree.run_depth")
        assert leases.redeliver_lost() == []  # held: nothing to do
        holder.kill()
        holder.wait()
        wait_until(lambda: leases.lost("job4"), 10 * LEASE_S, "the lost task")
        assert leases.redeliver_lost() == []  # first seen lost: marked, not yet handed back
        handed_back = wait_until(leases.redeliver_lost, 10 * LEASE_S, "the task handed back")
        assert handed_back == [task_id]
        assert redis_client.zscore("unacked_index", taken.delivery_tag) == 0
        assert leases.redeliver_lost() == []  # once
        queue.channel.qos.restore_visible()  # what every worker runs every few seconds
        again = queue.get(timeout=10)
        assert again.headers["id"] == task_id and again.payload == {"step": 1}
        again.ack()
        queue.close()
    assert redis_client.hlen(leases.running_key) == 0


def test_a_task_whose_worker_could_not_renew_for_a_while_is_not_handed_back(
    redis_client: redis.Redis, redis_url: str
):
    """A worker that Redis (or a frozen machine) kept from renewing renews within a third of
    a lease once it can: the mark the first sweep left is dropped, and the task stays."""
    import os
    import signal

    leases = TaskLeases(redis_client, LEASE_S, redelivery_s=3600.0, prefix="leases-e:")
    holder = holding_process(redis_url, "leases-e:", "job5", "task-5", "archtree.run_depth")
    try:
        os.kill(holder.pid, signal.SIGSTOP)
        wait_until(lambda: leases.lost("job5"), 10 * LEASE_S, "the lease expired")
        assert leases.redeliver_lost() == []  # seen lost: marked
        os.kill(holder.pid, signal.SIGCONT)
        wait_until(lambda: not leases.lost("job5"), 10 * LEASE_S, "the lease renewed")
        deadline = time.monotonic() + 3 * LEASE_S
        while time.monotonic() < deadline:  # a whole lease after the mark, and more
            assert leases.redeliver_lost() == []
            time.sleep(LEASE_S / 8)
        assert redis_client.hexists(leases.running_key, "task-5")
    finally:
        holder.kill()
        holder.wait()
