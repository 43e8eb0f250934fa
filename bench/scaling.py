"""Section 4, parallel scaling: the same evaluation-bound job with 1 and with 2 Celery workers.

Each configuration gets its own private redis-server (so no latency measurement is cached
from the other run), one agent with short timing settings (measurements are cheap, so the
job is bound by the children's fine-tuning), and workers with one torch thread each. The job
is submitted with `workers.tasks.submit_job`, as the API does, and timed from submission to
its final status. The speedup is the ratio of wall time per evaluated candidate, 1 worker / 2
workers: the plain wall-time ratio when both runs evaluate as many candidates (the tree
depends on measured latencies, so they may not).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import SectionResult, make_row
from bench.service_overhead import ServiceStack, missing_prerequisites

NAME, TITLE = "scaling", "Parallel scaling"
DEVICE_CLASS = "bench-scaling"
# Short agent timings: the job must be bound by child evaluation, not by the one agent.
AGENT_TIMING = {"warmup_runs": 3, "warmup_s": 0.01, "min_runs": 10, "min_time_s": 0.03}
JOB_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class ScalingConfig:
    """The job run with each worker count."""

    model: str
    data: str
    budget: str
    search: dict[str, Any]
    # The worker count of each run, in the order run: 1 and 2 each once or more.
    order: tuple[int, ...] = (1, 2)
    agent_timing: dict[str, Any] = field(default_factory=lambda: dict(AGENT_TIMING))


FULL = ScalingConfig(
    "builtin:resnet",
    "builtin:mnist",
    "60%",
    {"width": 4, "branching": 4, "planned_steps": 2, "max_depth": 3, "ft_steps": 300},
    order=(1, 2, 2, 1),
)
QUICK = ScalingConfig(
    "builtin:vgg",
    "builtin:digits",
    "70%",
    {"width": 2, "branching": 2, "planned_steps": 2, "max_depth": 2, "ft_steps": 20},
)


def estimate_s(config: ScalingConfig) -> float:
    """Rough seconds on a quiet machine for both jobs and the process starts."""
    per_child = 0.05 * config.search.get("ft_steps", 20) + 1.0
    children = config.search.get("branching", 4) * (1 + config.search.get("width", 4))
    one_worker = children * per_child + 20
    return sum(one_worker / n + 15 for n in config.order)


def job_phases(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a job's time went, from its events: `start_s` (submission to the first depth:
    queueing, baseline, feasibility), `search_s` (the depths, whose children run in parallel),
    `ending_s` (after the last depth: re-ranking, confirmation, trims and the final fine-tune,
    on one worker), and what the ending did: confirmations that failed, whether the best
    was trimmed (kept or compared with the next best), and whether the answer was replaced by
    a widened one to fill the budget's slack."""
    times = {}
    failed, trimmed, filled = 0, False, False
    for event in events:
        kind = event["kind"]
        if kind == "depth_started":
            times.setdefault("first_depth", event["time"])
        elif kind == "depth_done":
            times["last_depth_done"] = event["time"]
        elif kind == "done":
            times["done"] = event["time"]
        elif kind == "confirm_failed":
            failed += 1
        elif kind == "trim_compared" or (kind == "confirmed" and event.get("trims", 0) > 0):
            trimmed = True
        elif kind == "filled":
            filled = event.get("id") is not None and event.get("chosen") == event["id"]
    submitted = events[0]["time"] if events else None

    def span(first: str | None, last: str) -> float | None:
        begin = submitted if first is None else times.get(first)
        end = times.get(last)
        return None if begin is None or end is None else round(end - begin, 1)

    return {
        "start_s": span(None, "first_depth"),
        "search_s": span("first_depth", "last_depth_done"),
        "ending_s": span("last_depth_done", "done"),
        "confirm_failed": failed,
        "trimmed": trimmed,
        "filled": filled,
    }


def run_job(
    config: ScalingConfig, workers: int, work_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The job on a fresh stack with `workers` workers: one row."""
    import redis

    from archtree_cli.settings import ServiceSettings
    from workers.celery_app import create_app
    from workers.job_store import FINAL_STATUSES, JobStore
    from workers.tasks import submit_job

    spec = {
        "model": config.model,
        "data": config.data,
        "weights": None,
        "allow_pickle": False,
        "num_classes": None,
        "budget": config.budget,
        "device_class": DEVICE_CLASS,
        "batch_size": 1,
        "dtype": "float32",
        "search": config.search,
    }
    with ServiceStack(work_dir, log) as stack:
        url = stack.start_redis()
        stack.start_agent(DEVICE_CLASS, config.agent_timing)
        stack.start_workers(workers)
        jobs = JobStore(redis.Redis.from_url(url))
        app = create_app(ServiceSettings(redis_url=url))
        started = time.monotonic()
        job_id = submit_job(jobs, spec, celery=app)
        deadline = started + JOB_TIMEOUT_S
        job = jobs.get(job_id)
        while job["status"] not in FINAL_STATUSES and time.monotonic() < deadline:
            time.sleep(0.2)
            job = jobs.get(job_id)
        wall_s = time.monotonic() - started
        events = [event for _, event in jobs.read_events(job_id, count=100_000)]
        app.close()
        jobs.client.close()
    progress = job["progress"]
    return make_row(
        NAME,
        config.model,
        budget_fraction=float(config.budget.rstrip("%")) / 100,
        strategy="archtree",
        latency_ms=(progress.get("final") or {}).get("latency_ms"),
        budget_ms=progress.get("budget_ms"),
        accuracy=(progress.get("final") or {}).get("accuracy"),
        candidates=progress.get("candidates_evaluated"),
        measurements=progress.get("measurements"),
        wall_s=wall_s,
        metric="job",
        workers=workers,
        status=job["status"],
        error=job["error"],
        depth=progress.get("depth"),
        **job_phases(events),
    )


def per_candidate_s(runs: list[dict[str, Any]]) -> float:
    """Wall seconds per evaluated candidate, pooled over runs."""
    return sum(r["wall_s"] for r in runs) / sum(r["candidates"] for r in runs)


def speedup_row(model: str, one: list[dict[str, Any]], two: list[dict[str, Any]]) -> dict:
    """The speedup of 2 workers over 1, pooled over the runs of each count, and per round (the
    i-th run with 1 worker against the i-th with 2)."""
    pairs = zip(one, two, strict=False)
    rounds = [round(per_candidate_s([a]) / per_candidate_s([b]), 3) for a, b in pairs]
    return make_row(
        NAME,
        model,
        metric="speedup",
        workers="1 vs 2",
        speedup=per_candidate_s(one) / per_candidate_s(two),
        wall_ratio=(sum(r["wall_s"] for r in one) / len(one))
        / (sum(r["wall_s"] for r in two) / len(two)),
        round_speedups=rounds,
    )


def run(
    config: ScalingConfig,
    work_dir: Path,
    log: Callable[[str], None] = print,
) -> SectionResult:
    """The job with each worker count, then the speedup row."""
    started = time.monotonic()
    missing = missing_prerequisites()
    if missing:
        return SectionResult(NAME, TITLE, status="skipped", note=missing)
    result = SectionResult(NAME, TITLE)
    result.settings = {
        "job": f"{config.model} on {config.data} at {config.budget}",
        "search": ", ".join(f"{k} {v}" for k, v in config.search.items()),
        "agent timing": f"min_time_s {config.agent_timing['min_time_s']}",
        "torch threads per worker": 1,
    }
    done: dict[int, list[dict[str, Any]]] = {}
    for index, workers in enumerate(config.order):
        log(f"scaling: run {index + 1} of {len(config.order)}: {workers} worker(s) ...")
        row = run_job(config, workers, work_dir / f"run-{index + 1}-workers-{workers}", log)
        row["details"]["run"] = index + 1
        result.rows.append(row)
        details = row["details"]
        log(
            f"scaling: {workers} worker(s): {details['status']} in {row['wall_s']:.1f} s "
            f"(start {details['start_s']} s, depths {details['search_s']} s, ending "
            f"{details['ending_s']} s, {details['confirm_failed']} confirmations failed)"
        )
        if details["status"] == "succeeded" and row["candidates"]:
            done.setdefault(workers, []).append(row)
    if 1 in done and 2 in done:
        result.rows.append(speedup_row(config.model, done[1], done[2]))
        counts = {row["candidates"] for row in done[1] + done[2]}
        if len(counts) > 1:
            result.note = (
                f"the runs evaluated {' and '.join(map(str, sorted(counts)))} candidates: the "
                f"speedup is per evaluated candidate (the plain wall-time ratio is "
                f"{result.rows[-1]['details']['wall_ratio']:.2f})"
            )
    else:
        result.note = "no speedup: a job did not succeed (see its status and error)"
    result.wall_s = time.monotonic() - started
    return result
