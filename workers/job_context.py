"""A job's SearchContext, built from the spec the API stored, and cached per worker process.

Loading data and model takes seconds, and every task of a job needs them; a worker keeps the
contexts of the few jobs it served last.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import torch

from archtree_cli.settings import ServiceSettings
from latency.device_registry import DeviceRegistry
from latency.redis_connection import redis_client
from latency.remote_oracle import RemoteOracle
from search.budget import Budget, parse_budget
from search.compute_device import UnknownDevice, resolve_train_device
from search.context import SearchContext
from search.errors import ArchtreeError
from search.inputs import load_inputs
from search.settings import SearchSettings
from workers.artifact_store import ArtifactNodeStore, ArtifactStore
from workers.job_store import FINAL_STATUSES, JobStore, RedisEventSink
from workers.task_leases import TaskLeases

ARTIFACT_PREFIX = "artifact:"
# How long a measurement waits for its device class to have an agent online again before the
# task gives its worker back (tasks.py then waits for the device without holding one).
DEVICE_RELEASE_S = 2.0


@dataclass
class WorkerServices:
    """What all tasks of a worker process share: settings, Redis, job and artifact stores."""

    settings: ServiceSettings
    client: redis.Redis
    jobs: JobStore
    artifacts: ArtifactStore
    leases: TaskLeases

    @classmethod
    def connect(cls, settings: ServiceSettings) -> WorkerServices:
        client = redis_client(settings.resolved_redis_url())
        return cls(
            settings,
            client,
            JobStore(client),
            ArtifactStore(settings.artifacts_url),
            TaskLeases.of(client, settings),
        )


@dataclass
class JobContext:
    """One job's search context, with the rest of its spec."""

    job_id: str
    spec: dict[str, Any]
    context: SearchContext
    budget: Budget
    nodes: ArtifactNodeStore

    def report_inputs(self) -> dict[str, Any]:
        """The report's `inputs`: the sources and budget in the user's own words."""
        return {
            "model": self.spec["model"],
            "weights": source_as_given(self.spec, "weights"),
            "data": source_as_given(self.spec, "data"),
            "budget": str(self.budget),
        }


def source_as_given(spec: dict[str, Any], name: str) -> str | None:
    """The job's `weights` or `data` as the user gave it: a builtin dataset by its name, an
    upload by the file name it was sent with (the service stores it under its own name, which
    means nothing to the user and names nothing once the job is deleted)."""
    source = spec.get(name)
    if source is None or not source.startswith(ARTIFACT_PREFIX):
        return source
    sent = (spec.get("upload_names") or {}).get(name)
    return f"{sent} (uploaded)" if sent else f"{name} uploaded without a file name"


def build_job_context(
    services: WorkerServices, job_id: str, worker: str | None = None
) -> JobContext:
    """Load the job's inputs and connect its oracle, node store and event sink.

    `worker` (the Celery worker's name) is recorded in every event the job emits here.
    """
    jobs, settings = services.jobs, services.settings
    job = jobs.get(job_id)
    if job is None:
        raise ArchtreeError(f"job {job_id} does not exist")
    spec = job["spec"]
    try:
        search_settings = SearchSettings.from_dict(spec.get("search") or {}).effective()
    except TypeError as error:
        raise ArchtreeError(f"the job's search settings are not valid ({error})") from None
    budget = parse_budget(spec["budget"])
    inputs = load_inputs(
        spec["model"],
        _local_path(services, spec["data"]),
        weights=_local_path(services, spec.get("weights")),
        allow_pickle=bool(spec.get("allow_pickle", False)),
        num_classes=spec.get("num_classes"),
        seed=search_settings.seed,
    )

    def on_waiting(waiting: bool) -> None:
        jobs.set_status_if_active(job_id, "waiting_for_device" if waiting else "running")

    oracle = RemoteOracle(
        services.client,
        spec.get("device_class", "local"),
        batch_size=int(spec.get("batch_size", 1)),
        dtype=spec.get("dtype", "float32"),
        timeout_s=settings.measurement_timeout_s,
        wait_for_device_s=settings.device_wait_s,
        release_after_s=DEVICE_RELEASE_S,
        on_waiting=on_waiting,
        on_measured=lambda agent_id: jobs.count_agent_measurement(job_id, agent_id),
        cancelled=lambda: jobs.cancel_requested(job_id),
        registry=DeviceRegistry(services.client, settings.heartbeat_ttl_s),
    )
    nodes = ArtifactNodeStore(services.artifacts, job_id)
    sink = RedisEventSink(jobs, job_id, **({"worker": worker} if worker else {}))
    context = SearchContext(
        train_device=_train_device(settings.train_device),
        model_ref=inputs.model_ref,
        base_model=inputs.model,
        data=inputs.data,
        oracle=oracle,
        settings=search_settings,
        store=nodes,
        sink=sink,
        cancelled=lambda: jobs.cancel_requested(job_id),
    )
    # Each child runs on a shallow copy of the context: the reference outputs computed now
    # are shared by all of them instead of being recomputed per child.
    context.prepare()
    return JobContext(job_id=job_id, spec=spec, context=context, budget=budget, nodes=nodes)


def _train_device(name: str) -> torch.device:
    """This worker's training device, resolved in the process that runs the task (a GPU is
    only looked for there, after the pool has forked)."""
    try:
        return resolve_train_device(name)
    except UnknownDevice as error:
        raise ArchtreeError(
            f"this worker's training device (its --train-device or ARCHTREE_TRAIN_DEVICE) "
            f"cannot be used: {error}"
        ) from None


def _local_path(services: WorkerServices, source: str | None) -> str | None:
    """`artifact:NAME` as a file on this machine; other sources unchanged."""
    if not source or not source.startswith(ARTIFACT_PREFIX):
        return source
    name = source.removeprefix(ARTIFACT_PREFIX)
    if not services.artifacts.exists(name):
        raise ArchtreeError(f"the job's input {source} is missing from the artifact store")
    cache_dir = Path(services.settings.work_dir) / "artifacts"
    forget_ended_copies(services.jobs, cache_dir)
    return str(services.artifacts.local_copy(name, cache_dir))


def forget_ended_copies(jobs: JobStore, cache_dir: Path) -> None:
    """Remove this machine's copies of the uploads of jobs that have ended or are gone (a
    remote artifact store's files are copied here to be read): done before a job's inputs
    are copied, so that the copies stay those of the jobs still running."""
    folder = cache_dir / "jobs"
    if not folder.is_dir():
        return
    for copied in folder.iterdir():
        job = jobs.get(copied.name)
        if job is None or job["status"] in FINAL_STATUSES:
            shutil.rmtree(copied, ignore_errors=True)


class JobContexts:
    """The contexts of the jobs this process served last, by job id (least recent evicted)."""

    def __init__(self, services: WorkerServices, capacity: int = 4) -> None:
        self.services = services
        self.capacity = capacity
        self._contexts: OrderedDict[str, JobContext] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str, worker: str | None = None) -> JobContext:
        with self._lock:
            if job_id in self._contexts:
                self._contexts.move_to_end(job_id)
                return self._contexts[job_id]
        built = build_job_context(self.services, job_id, worker)
        with self._lock:
            self._contexts[job_id] = built
            while len(self._contexts) > self.capacity:
                self._contexts.popitem(last=False)
        return built

    def drop(self, job_id: str) -> None:
        """Forget a job that has ended (and what a GPU kept cached for it, which the next job
        on this process would otherwise find taken)."""
        with self._lock:
            self._contexts.pop(job_id, None)
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
