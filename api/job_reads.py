"""Reads of the paths clients poll (a job's status, the job list) with redis.asyncio.

The job store (`workers.job_store.JobStore`) is synchronous: called from a route it costs a
thread-pool hop per request, which dominated the status endpoint's time under load. These read
the same keys on the event loop and decode them with `JobStore.record`, so they return the
same records as `JobStore.get` and `JobStore.list` (tests/test_api_serving.py checks that).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import redis.asyncio

from workers.job_store import JobStore
from workers.task_leases import LostTask, TaskLeases


async def read_job(
    client: redis.asyncio.Redis, jobs: JobStore, job_id: str
) -> dict[str, Any] | None:
    """The job's record as `JobStore.get` returns it; None when there is no such job."""
    return jobs.record(job_id, await client.hgetall(jobs.key(job_id)))


async def read_jobs(
    client: redis.asyncio.Redis,
    jobs: JobStore,
    offset: int,
    limit: int,
    statuses: Collection[str] = (),
) -> tuple[list[dict[str, Any]], int]:
    """Jobs newest first and the total count, as `JobStore.list` returns them, in two round
    trips; with `statuses`, only the jobs in those (and their count), in three."""
    index = jobs.index_key
    if statuses:
        ids, total = await _ids_in_statuses(client, jobs, statuses)
        ids = ids[offset : offset + limit]
    else:
        ids = [raw.decode() for raw in await client.zrevrange(index, offset, offset + limit - 1)]
    async with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hgetall(jobs.key(job_id))
        if not statuses:
            pipe.zcard(index)
        answers = await pipe.execute()
    if not statuses:
        *answers, total = answers
    records = [jobs.record(job_id, raw) for job_id, raw in zip(ids, answers, strict=True)]
    return [record for record in records if record is not None], int(total)


async def _ids_in_statuses(
    client: redis.asyncio.Redis, jobs: JobStore, statuses: Collection[str]
) -> tuple[list[str], int]:
    """The ids of the jobs in `statuses`, newest first, and how many they are."""
    ids = [raw.decode() for raw in await client.zrevrange(jobs.index_key, 0, -1)]
    async with client.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hget(jobs.key(job_id), "status")
        answers = await pipe.execute()
    wanted = {status.encode() for status in statuses}
    kept = [job_id for job_id, status in zip(ids, answers, strict=True) if status in wanted]
    return kept, len(kept)


async def read_lost_tasks(
    client: redis.asyncio.Redis, leases: TaskLeases, job_id: str
) -> list[LostTask]:
    """The job's tasks whose worker was lost, as `TaskLeases.lost` returns them."""
    return leases.lost_among(await client.eval(*leases.lost_query(job_id)))
