"""Readiness and Prometheus metrics, read from Redis at each request.

The API cannot see the workers' measurements itself: their latency oracles count them, and
keep the latest round-trip times, in Redis through the device registry.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from statistics import quantiles

import redis
from kombu.exceptions import OperationalError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from api.deps import Services
from api.schemas import Readiness

WORKER_PING_TIMEOUT_S = 0.5
# Pings sent before no worker is said to answer: a busy machine may answer the first late.
WORKER_PINGS = 2
NO_WORKER = (
    f"no Celery worker answered {WORKER_PINGS} pings of {WORKER_PING_TIMEOUT_S} s: jobs are "
    "accepted but "
    "wait in the queue until one starts (`archtree worker`, or `archtree up` for the whole stack)"
)
ROUND_TRIP_QUANTILES = (0.5, 0.9, 0.99)

__all__ = ["CONTENT_TYPE_LATEST", "metrics_text", "readiness"]


def readiness(services: Services) -> Readiness:
    """Redis reachable (else unavailable), Celery workers answering a ping, agents online."""
    try:
        services.client.ping()
    except redis.RedisError as error:
        return Readiness(
            status="unavailable",
            redis=False,
            detail=f"Redis is not reachable ({type(error).__name__}: {error})",
        )
    workers = _workers_answering(services)
    return Readiness(
        status="ready",
        redis=True,
        workers=workers,
        agents_online=_online_per_class(services),
        # Still ready: the API takes jobs and queues them. The operator is told who is missing.
        detail=_queues_untaken(services) if workers else NO_WORKER,
    )


def _queues_untaken(services: Services) -> str | None:
    """What to say of the service's queues that no worker answering takes (workers started
    with --queues for one of them only), if any: jobs wait there, their status unchanged."""
    queues = [services.settings.search_queue, services.settings.evaluate_queue]
    with contextlib.suppress(OSError, redis.RedisError, OperationalError):
        inspect = services.celery.control.inspect(timeout=WORKER_PING_TIMEOUT_S * WORKER_PINGS)
        taken = {q["name"] for found in (inspect.active_queues() or {}).values() for q in found}
        untaken = [queue for queue in queues if queue not in taken]
        if untaken and taken:
            names = " and ".join(f"{queue!r}" for queue in untaken)
            return (
                f"no worker answering takes the {names} queue: its jobs wait there until one "
                f"does (`archtree worker --queues {','.join(untaken)}`, or without --queues for "
                "every queue)"
            )
    return None


def _workers_answering(services: Services) -> list[str]:
    """The Celery workers that answer a ping, asked up to WORKER_PINGS times."""
    for _ in range(WORKER_PINGS):
        with contextlib.suppress(OSError, redis.RedisError, OperationalError):
            replies = services.celery.control.ping(timeout=WORKER_PING_TIMEOUT_S)
            if replies:
                return sorted(name for reply in replies for name in reply)
    return []


def _online_per_class(services: Services) -> dict[str, int]:
    online = Counter(
        device.get("device_class", "") for device in services.registry.list() if device["online"]
    )
    return dict(sorted(online.items()))


class ServiceCollector(Collector):
    """Jobs by status, measurements, queue depth and agents per device class, round trips."""

    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("archtree_redis_up", "Whether Redis answered this scrape.")
        try:
            families = list(self._families())
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _families(self) -> Iterator[Metric]:
        services = self.services
        jobs = GaugeMetricFamily("archtree_jobs", "Jobs by status.", labels=["status"])
        for status, count in services.jobs.counts_by_status().items():
            jobs.add_metric([status], count)
        yield jobs

        stats = services.registry.measurement_stats()
        classes = sorted(set(services.registry.classes()) | set(stats["by_class"]))
        queue = GaugeMetricFamily(
            "archtree_measurement_queue_depth",
            "Measurement requests not answered yet.",
            labels=["device_class"],
        )
        agents = GaugeMetricFamily(
            "archtree_agents_online", "Agents online.", labels=["device_class"]
        )
        online = _online_per_class(services)
        for name in classes:
            queue.add_metric([name], services.registry.queue_depth(name))
            agents.add_metric([name], online.get(name, 0))
        yield queue
        yield agents

        measurements = CounterMetricFamily(
            "archtree_measurements",
            "Latency measurements answered by agents.",
            labels=["device_class"],
        )
        round_trip = SummaryMetricFamily(
            "archtree_measurement_round_trip_seconds",
            "Time from sending a measurement request to receiving its reply.",
            labels=["device_class"],
        )
        recent = GaugeMetricFamily(
            "archtree_measurement_round_trip_recent_seconds",
            "Quantiles of the latest measurement round trips.",
            labels=["device_class", "quantile"],
        )
        for name, count in sorted(stats["by_class"].items()):
            measurements.add_metric([name], count)
            round_trip.add_metric([name], count, stats["round_trip_sum_s"].get(name, 0.0))
            samples = stats["recent_s"].get(name, [])
            if len(samples) >= 2:
                cuts = quantiles(samples, n=100, method="inclusive")
                for q in ROUND_TRIP_QUANTILES:
                    recent.add_metric([name, f"{q:g}"], cuts[round(q * 100) - 1])
        yield measurements
        yield round_trip
        yield recent


def metrics_text(services: Services) -> bytes:
    """The Prometheus exposition of the service's metrics (a registry of its own)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(services))
    return generate_latest(registry)
