"""Celery tasks: thin adapters that run the engine's steps of a job across workers.

    start_job -> run_depth -> chord(evaluate_child per child) -> advance_depth -> run_depth ...
                   (done) -> chord(retune_candidate per candidate to retune) -> finish_job

These are the steps of `search.engine.run_search`, with the children of a depth spread over
the workers and the SearchState kept in the JobStore between steps. No task waits on another.

A worker may die at any point; its task is then delivered again. So every task is idempotent:
`start_job` does not restart a job that has a state, `run_depth` plans a depth once,
`evaluate_child` keeps the first evaluation stored for a child, `advance_depth` applies a depth
once, `retune_candidate` keeps the first retuning stored for a candidate (and the weights of
that run), and each next step is sent again only if the previous run died before sending it.
"""

from __future__ import annotations

import copy
import functools
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery, Task, chord
from celery.canvas import Signature
from kombu.exceptions import OperationalError

from archtree_cli.settings import service_settings
from latency.device_registry import DeviceRegistry
from latency.remote_oracle import DeviceAbsent, no_agent_message
from search import engine, expansion
from search.artifacts import ARTIFACT_NAMES, save_artifacts
from search.errors import ArchtreeError, SearchCancelled, first_line
from search.report import build_report
from search.tree import ChildResult, ChildTask, SearchState
from workers.artifact_store import ArtifactNodeStore, ArtifactStoreError, AttemptNodeStore
from workers.celery_app import (
    ADVANCE_DEPTH,
    EVALUATE_CHILD,
    FINISH_JOB,
    RETUNE_CANDIDATE,
    RUN_DEPTH,
    START_JOB,
    app,
)
from workers.job_context import JobContexts, WorkerServices
from workers.job_store import FINAL_STATUSES, REDIS_UNREACHABLE, JobStore

log = logging.getLogger("archtree.worker")

# How long a step waits for an unreachable Redis before it gives up, and how many times one
# step is run again for it.
REDIS_WAIT_S = 600.0
REDIS_RETRIES = 10
# How often a job that waits for an agent of its device class to come online looks again.
DEVICE_POLL_S = 2.0


def result_name(job_id: str, name: str) -> str:
    """Where a finished job's file (arch.json, model.safetensors, report.json) is stored."""
    return f"jobs/{job_id}/result/{name}"


def submit_job(
    store: JobStore,
    spec: dict[str, Any],
    *,
    celery: Celery | None = None,
    job_id: str | None = None,
    notes: list[str] | None = None,
    api_url: str | None = None,
    store_marker: str | None = None,
) -> str:
    """Create a queued job with `spec` and send its start to the workers; returns its id.

    `celery` is the app to send with (default: the one configured from the environment);
    `job_id` is given when the job's uploads were stored under it beforehand; `notes` are
    remarks on the submission the job shows from the start (settings its strategy overrides);
    `api_url` is the API it was submitted to, which the job's messages name; `store_marker` a
    file put in the artifact store for the job, which its first step checks the worker's own
    store holds (the API and the workers must share one).
    """
    job_id = store.create(
        spec, job_id=job_id, notes=notes, api_url=api_url, store_marker=store_marker
    )
    try:
        # Its result is never read: not subscribing to it spares the sender a connection to
        # the result backend (one per thread, which a stalled Redis would hold with no timeout).
        (celery or app).send_task(START_JOB, args=[job_id], ignore_result=True)
    except OperationalError as error:  # the broker's Redis cannot be reached, or stalls
        store.set_status(
            job_id, "failed", f"the job could not be queued, Redis did not take it ({error}): "
            "submit it again"
        )  # fmt: skip
        raise
    except Exception as error:
        store.set_status(job_id, "failed", f"internal error: could not queue the job: {error}")
        raise
    return job_id


@functools.cache
def _services() -> WorkerServices:
    # Created on first use, so each worker process (after the fork) has its own connections.
    return WorkerServices.connect(service_settings())


@functools.cache
def _contexts() -> JobContexts:
    return JobContexts(_services())


@app.task(name=START_JOB, bind=True)
def start_job(self, job_id: str) -> None:
    """Measure the baseline and plant the root (once), then start the first depth."""
    jobs = _services().jobs
    with _job_step(self, job_id):
        if not _active(job_id):
            return
        if jobs.load_state(job_id) is None:
            _require_device(job_id)
            _check_store_shared(job_id)
            jobs.set_status_if_active(job_id, "running")
            if "started_at" not in jobs.get(job_id)["progress"]:
                jobs.update_progress(job_id, started_at=time.time())
            job = _contexts().get(job_id, self.request.hostname)
            state = engine.start(job.context, job.budget)
            if jobs.save_state_if(job_id, state.to_dict(), expected_depth=None):
                _record_progress(jobs, job_id, state)
        _send_once(jobs, job_id, "run_depth:1", run_depth.si(job_id))


def _check_store_shared(job_id: str) -> None:
    """ArtifactStoreError when this worker's artifact store lacks the file the job's
    submission put in the API's: its results would land where the API never finds them."""
    services = _services()
    marker = services.jobs.store_marker(job_id)
    if marker and not services.artifacts.exists(marker):
        raise ArtifactStoreError(
            f"{marker} is missing from this worker's artifact store {services.artifacts.root}: "
            "the API put it in its own; give the API and the workers the same "
            "ARCHTREE_ARTIFACTS_URL",
            for_client="the workers' artifact store is not the API's (the job's submitted "
            "files are not in it)",
        )


def _require_device(job_id: str) -> None:
    """DeviceAbsent while the job's device class has no agent online (`_job_step` then waits
    for one without holding a worker); once one is back, the job runs again, whichever wait
    made it `waiting_for_device` (this one's, or a measurement's whose worker was lost)."""
    services = _services()
    job = services.jobs.get(job_id)
    if job is None:
        return
    device_class = job["spec"].get("device_class", "local")
    registry = DeviceRegistry(services.client, services.settings.heartbeat_ttl_s)
    if registry.live_agents(device_class) == 0:
        raise DeviceAbsent(device_class)
    if job["progress"].get("device_wait_since") is not None:
        services.jobs.update_progress(job_id, device_wait_since=None, device_wait_until=None)
    if job["status"] == "waiting_for_device":
        services.jobs.set_status_if_active(job_id, "running")


def _wait_for_device(task: Task, job_id: str, device_class: str) -> None:
    """Wait as `waiting_for_device` without holding a worker: the step runs again in
    DEVICE_POLL_S, and the job fails once it has waited ARCHTREE_DEVICE_WAIT_S in all."""
    services = _services()
    job = services.jobs.get(job_id)
    if job is None or job["status"] in FINAL_STATUSES:
        return
    now = time.time()
    since = job["progress"].get("device_wait_since")
    if since is None:
        since = now
        # When it fails if none comes: said with the wait, on the dashboard and by `status`.
        until = since + services.settings.device_wait_s
        services.jobs.update_progress(job_id, device_wait_since=since, device_wait_until=until)
        log.warning(
            "job %s: no agent of device class %s online; waiting without a worker",
            job_id,
            device_class,
        )
    services.jobs.set_status_if_active(job_id, "waiting_for_device")
    if now - since >= services.settings.device_wait_s:
        waited_s = services.settings.device_wait_s
        _end(job_id, "failed", no_agent_message(device_class, waited_s, job.get("api_url")))
        return
    _run_again(task, countdown=DEVICE_POLL_S)


def _run_again(task: Task, countdown: float) -> None:
    """Send the task again with the same id (so a child still counts for its depth's next
    step) in `countdown` seconds. Its callers bound how often: Celery's own count of retries
    would mix device waits with Redis outages."""
    raise task.retry(countdown=countdown, max_retries=task.request.retries + 1)


@app.task(name=RUN_DEPTH, bind=True)
def run_depth(self, job_id: str) -> None:
    """Plan the next depth (once), and evaluate its children in parallel, then advance."""
    jobs = _services().jobs
    with _job_step(self, job_id):
        if not _active(job_id):
            return
        state = _load_state(jobs, job_id)
        if state.done:
            _send_ending(jobs, job_id, state, self.request.hostname)
            return
        depth = state.depth + 1
        planned = jobs.load_plan(job_id, depth)
        if planned is None:
            job = _contexts().get(job_id, self.request.hostname)
            tasks = [task.to_dict() for task in engine.plan(job.context, state)]
            if jobs.save_plan(job_id, depth, tasks, state.to_dict()):
                planned = tasks
            else:
                planned = jobs.load_plan(job_id, depth)
        if planned is None:
            return  # the state moved past this depth: a later step carries the job on
        callback = advance_depth.s(job_id, depth)
        children = [evaluate_child.s(job_id, task) for task in planned]
        step = chord(children, callback) if children else advance_depth.si([], job_id, depth)
        _send_once(jobs, job_id, f"children:{depth}", step)


@app.task(name=EVALUATE_CHILD, bind=True)
def evaluate_child(self, job_id: str, task: dict[str, Any]) -> dict[str, Any] | None:
    """Evaluate one child and store the result; a child evaluated before returns that result.

    Two runs of one child (a redelivered task) may find different children: each writes its
    weights under its own attempt, and the run whose result was stored first provides both.
    """
    jobs = _services().jobs
    child_id = task["child_id"]

    def evaluate(attempt: str) -> dict[str, Any]:
        job = _contexts().get(job_id, self.request.hostname)
        run = jobs.count_child_run(job_id, child_id)
        again = {"run": run} if run > 1 else {}  # said as such: an earlier run was cut short
        job.context.sink.emit("child_started", id=child_id, depth=task["depth"], **again)
        context = copy.copy(job.context)
        context.store = AttemptNodeStore(job.nodes, child_id, attempt)
        result = expansion.evaluate_child(context, ChildTask.from_dict(task))
        return {"attempt": attempt, "result": result.to_dict()}

    with _job_step(self, job_id):
        stored = _stored_once(jobs, job_id, child_id, child_id, evaluate)
        if stored is None:
            return None
        if stored["result"]["node"] is not None:
            ArtifactNodeStore(_services().artifacts, job_id).commit(child_id, stored["attempt"])
        return stored["result"]
    return None


def _stored_once(
    jobs: JobStore,
    job_id: str,
    key: str,
    node_id: str,
    compute: Callable[[str], dict[str, Any]],
) -> dict[str, Any] | None:
    """The result stored under `key`, computed by `compute(attempt)` when none is yet (None
    when the job has ended). A redelivered task may run twice: each run writes the weights of
    `node_id` under its own attempt, the result stored first wins, and a run that lost
    discards its attempt's weights."""
    stored = jobs.load_child_result(job_id, key)
    if stored is not None:
        return stored
    if not _active(job_id):
        return None
    _require_device(job_id)
    attempt = uuid.uuid4().hex[:12]
    result = compute(attempt)
    if jobs.save_child_result(job_id, key, result):
        return result
    ArtifactNodeStore(_services().artifacts, job_id).discard(node_id, attempt)
    return jobs.load_child_result(job_id, key)


@app.task(name=ADVANCE_DEPTH, bind=True)
def advance_depth(self, results: list[dict[str, Any] | None], job_id: str, depth: int) -> None:
    """Add a depth's evaluated children to the tree (once), then plan the next or finish."""
    jobs = _services().jobs
    with _job_step(self, job_id):
        if not _active(job_id):
            return
        state = _load_state(jobs, job_id)
        if state.depth < depth:
            if any(result is None for result in results):
                raise RuntimeError(f"a child of depth {depth} has no result")
            job = _contexts().get(job_id, self.request.hostname)
            children = [ChildResult.from_dict(result) for result in results]
            state = engine.advance(job.context, state, children)
            if not jobs.save_state_if(job_id, state.to_dict(), expected_depth=depth - 1):
                return  # another run of this step applied the depth and carries the job on
            _record_progress(jobs, job_id, state)
            job.nodes.keep_only(engine.live_nodes(state))
        if state.done:
            _send_ending(jobs, job_id, state, self.request.hostname)
        else:
            _send_once(jobs, job_id, f"run_depth:{state.depth + 1}", run_depth.si(job_id))


def _send_ending(jobs: JobStore, job_id: str, state: SearchState, worker: str | None) -> None:
    """After the last depth: retune the best candidates in parallel, then finish."""
    if jobs.step_done(job_id, "finish"):
        return
    job = _contexts().get(job_id, worker)
    retunes = [retune_candidate.s(job_id, n.id) for n in engine.to_retune(job.context, state)]
    step = chord(retunes, finish_job.s(job_id)) if retunes else finish_job.si([], job_id)
    _send_once(jobs, job_id, "finish", step)


@app.task(name=RETUNE_CANDIDATE, bind=True)
def retune_candidate(self, job_id: str, node_id: str) -> dict[str, Any] | None:
    """Fine-tune one of the best candidates more and score it (`engine.retune`); a candidate
    retuned before returns that result. Each run writes its weights under its own attempt,
    and the run whose result was stored first provides them."""
    jobs = _services().jobs

    def retune(attempt: str) -> dict[str, Any]:
        job = _contexts().get(job_id, self.request.hostname)
        node = _load_state(jobs, job_id).nodes[node_id]
        weights_id = job.nodes.attempt_id(node_id, attempt)
        return engine.retune(job.context, node, weights_id=weights_id)

    with _job_step(self, job_id):
        return _stored_once(jobs, job_id, f"{node_id}/retune", node_id, retune)
    return None


@app.task(name=FINISH_JOB, bind=True)
def finish_job(self, retuned: list[dict[str, Any] | None], job_id: str) -> None:
    """Choose and confirm the answer under budget, store arch.json, model.safetensors and
    report.json. `retuned`: the results of retune_candidate, in the order sent."""
    services = _services()
    jobs = services.jobs
    with _job_step(self, job_id):
        if not _active(job_id):
            return
        if any(result is None for result in retuned):
            raise RuntimeError("a candidate to retune has no result")
        _require_device(job_id)  # the answer's latency is confirmed on it
        job = _contexts().get(job_id, self.request.hostname)
        state = _load_state(jobs, job_id)
        started_at = jobs.get(job_id)["progress"].get("started_at", time.time())
        # finish() measures wall time on the monotonic clock, which is per machine.
        started = time.monotonic() - (time.time() - started_at)
        outcome = engine.finish(job.context, state, started, retuned)
        report = build_report(job.context, outcome, job.report_inputs())
        # Every agent of the class that answered the job's measurements, not only the one
        # whose fingerprint the device section holds (it confirmed the answer, or served
        # the cache).
        report["device"]["agents"] = jobs.agent_measurements(job_id)
        # As `archtree prune` does, the notes about the settings lead the report's own.
        report["notes"] = _with_submission_notes(jobs, job_id, report["notes"])
        work_dir = Path(services.settings.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_dir) as folder:
            save_artifacts(folder, outcome.answer.spec, outcome.model, report)
            for name in ARTIFACT_NAMES:
                data = (Path(folder) / name).read_bytes()
                services.artifacts.put_bytes(result_name(job_id, name), data)
        jobs.save_state(job_id, outcome.state.to_dict())
        _record_progress(jobs, job_id, outcome.state)
        jobs.update_progress(
            job_id,
            final={
                "id": outcome.answer.id,
                "latency_ms": outcome.confirmed_latency_ms,
                "accuracy": outcome.final_accuracy,
                "fidelity": outcome.final_fidelity,
            },
            notes=report["notes"],
        )
        _end(job_id, "succeeded")


def _with_submission_notes(jobs: JobStore, job_id: str, report_notes: list[str]) -> list[str]:
    """The submission's notes, then the report's (which replace those the run said)."""
    return [*jobs.get(job_id)["progress"].get("submission_notes", []), *report_notes]


@contextmanager
def _job_step(task: Task, job_id: str) -> Iterator[None]:
    """Ends the job when its step raises: cancelled, or failed with a one-line message (an
    artifact store's failure without the store's paths, which go to the log). When Redis
    cannot be reached (restarted, failed over), the step waits for it and runs again. The step
    holds a lease meanwhile, which says the task is lost if its worker dies."""
    try:
        leases = _services().leases
        with leases.hold(job_id, task.request.id, task.name, task.request.hostname or ""):
            yield
    except SearchCancelled:  # in a measurement or a fine-tune
        _end(job_id, "cancelled")
    except DeviceAbsent as absent:  # before the step, or in one of its measurements
        _wait_for_device(task, job_id, absent.device_class)
    except ArtifactStoreError as error:  # the store's paths are the operator's, in the log
        log.error("job %s: %s", job_id, error)
        _end(job_id, "failed", f"{error.for_client}: the operator's to fix (the workers' log "
             "says where)")  # fmt: skip
    except ArchtreeError as error:
        _end(job_id, "failed", str(error))
    except REDIS_UNREACHABLE as error:
        log.warning(
            "job %s: Redis unreachable (%s); the step runs again once it answers", job_id, error
        )
        if not _redis_answers_within(REDIS_WAIT_S):
            raise
        if _services().jobs.count_rerun(job_id, task.request.id) > REDIS_RETRIES:
            _end(job_id, "failed", f"Redis failed this job's step {REDIS_RETRIES} times ({error})")
            return
        _run_again(task, countdown=0)
    except Exception as error:
        log.exception("job %s: internal error", job_id)
        detail = first_line(error)
        _end(job_id, "failed", f"internal error: {type(error).__name__}: {detail}"[:500])


def _redis_answers_within(limit_s: float) -> bool:
    """Whether the job store's Redis answers a ping within `limit_s`, asking every second."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return bool(_services().jobs.client.ping())
        except REDIS_UNREACHABLE:
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def _end(job_id: str, status: str, error: str | None = None) -> None:
    jobs = _services().jobs
    if jobs.set_status_if_active(job_id, status, error):
        # The children of a depth left open count as evaluated, as the tree draws them: the
        # count of those of closed depths said 0 for a job cancelled in its first.
        evaluated = jobs.count_children_evaluated(job_id)
        job = jobs.get(job_id)
        if job is not None and evaluated > (job["progress"].get("candidates_evaluated") or 0):
            jobs.update_progress(job_id, candidates_evaluated=evaluated)
    _contexts().drop(job_id)
    _clear_nodes(job_id)


def _clear_nodes(job_id: str) -> None:
    """Remove the ended job's candidate weights (a job's tree can hold gigabytes of them);
    its inputs and result files stay."""
    try:
        ArtifactNodeStore(_services().artifacts, job_id).clear()
    except OSError as error:
        log.warning("job %s: its candidates' weights could not be removed (%s)", job_id, error)


def _active(job_id: str) -> bool:
    """Whether the job still runs; a cancel that was asked for ends it here."""
    job = _services().jobs.get(job_id)
    if job is None:
        log.warning("job %s does not exist: its task is dropped", job_id)
        return False
    if job["status"] in FINAL_STATUSES:
        return False
    if job["cancel_requested"]:
        _end(job_id, "cancelled")
        return False
    return True


def _load_state(jobs: JobStore, job_id: str) -> SearchState:
    data = jobs.load_state(job_id)
    if data is None:
        raise RuntimeError(f"job {job_id} has no saved search state")
    return SearchState.from_dict(data)


def _send_once(jobs: JobStore, job_id: str, step: str, signature: Signature) -> None:
    """Send the job's next step, unless an earlier run of the current task did."""
    if jobs.step_done(job_id, step):
        return
    # Marked after sending: a worker dying in between means the step is sent twice, which
    # the receiving task tolerates; marking first could lose the step.
    signature.apply_async()
    jobs.mark_step(job_id, step)


def _record_progress(jobs: JobStore, job_id: str, state: SearchState) -> None:
    best = state.best_within_budget()
    jobs.update_progress(
        job_id,
        depth=state.depth,
        baseline_ms=state.baseline_ms,
        budget_ms=state.budget_ms,
        candidates_evaluated=state.candidates_evaluated,
        measurements=state.measurements,
        cache_hits=state.cache_hits,
        best=(
            {"id": best.id, "latency_ms": best.latency_ms, "score": best.score} if best else None
        ),
    )
