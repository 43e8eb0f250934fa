"""Task leases on a private Redis: a task that runs keeps its lease however long it takes;
one whose process dies is lost within the lease's length (real worker deaths: test_workers,
test_service and test_dashboard)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import redis

from tests.redis_fixtures import ROOT, wait_until
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


def test_a_task_whose_process_dies_is_lost_and_announced_once(
    redis_client: redis.Redis, redis_url: str
):
    leases = TaskLeases(redis_client, LEASE_S, redelivery_s=30.0, prefix="leases-b:")
    jobs = JobStore(redis_client, prefix="leases-b:")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, redis\n"
            "from workers.task_leases import TaskLeases\n"
            f"leases = TaskLeases(redis.Redis.from_url(sys.argv[1]), {LEASE_S}, 30.0, "
            "prefix='leases-b:')\n"
            "with leases.hold('job2', 'task-2', 'archtree.run_depth', 'w2@host'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
            redis_url,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert leases.lost("job2") == []
        holder.kill()
        holder.wait()
        (lost,) = wait_until(lambda: leases.lost("job2"), 10 * LEASE_S, "the lost task")
    finally:
        holder.kill()
    assert (lost.task_id, lost.name, lost.worker) == ("task-2", "archtree.run_depth", "w2@host")
    assert lost.silent_s >= LEASE_S and lost.back_by == lost.started_at + 30.0
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
