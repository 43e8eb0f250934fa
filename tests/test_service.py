"""The whole service end to end over HTTP: a real API, two real Celery workers and real agents
on a private Redis, the Python client and the `archtree` service commands."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import redis
import torch

from archtree_cli.client import ArchtreeClient
from search.artifacts import ARTIFACT_NAMES, load_pruned
from search.errors import ArchtreeError
from search.inputs import load_inputs
from search.model_source import save_weights
from search.notes import NOTHING_PRUNED
from tests.api_fixtures import ApiProcess, api_env, free_port, start_api
from tests.redis_fixtures import ROOT, wait_until
from tests.worker_fixtures import WorkerPool
from workers.celery_app import celery_config
from workers.job_store import FINAL_STATUSES

pytest_plugins = ["tests.redis_fixtures", "tests.worker_fixtures", "tests.api_fixtures"]

# The top-level keys of the report `archtree prune` writes (search.report.build_report).
REPORT_KEYS = {"budget_ms", "notes", "inputs", "device", "baseline", "final", "search", "tree"}
FAST_SEARCH = {"width": 2, "branching": 2, "ft_steps": 5, "planned_steps": 2, "max_probes": 3,
               "select_steps": 10, "fill_probes": 2}  # fmt: skip
CLI_SEARCH = ["--width", "2", "--branching", "2", "--ft-steps", "5", "--planned-steps", "2",
              "--select-steps", "10", "--fill-probes", "2"]  # fmt: skip
# On this tiny input the smallest reachable VGG measures 40-55 % of the unpruned one; timing
# noise on a loaded 2-core machine must not make the budget unreachable.
BUDGET = "75%"
JOB_S = 180.0
AGENT_START_S = 60.0
# Agents claim the requests of a killed agent after this long.
CLAIM_IDLE_MS = 2000


def job_spec(device_class: str, **search: Any) -> dict[str, Any]:
    return {
        "model": "builtin:vgg",
        "data": "builtin:digits",
        "budget": BUDGET,
        "device_class": device_class,
        "search": {**FAST_SEARCH, **search},
    }


@pytest.fixture(scope="module")
def api(
    redis_url: str, worker_pool: WorkerPool, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ApiProcess]:
    """The API on the workers' Redis and artifact store, with two workers running."""
    redis.Redis.from_url(redis_url).flushdb()  # nothing queued by earlier modules
    worker_pool.ensure(2)
    base = tmp_path_factory.mktemp("service")
    env = api_env(redis_url, base, **worker_pool.api_settings())
    server = start_api(env, base / "logs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(api: ApiProcess) -> Iterator[ArchtreeClient]:
    with ArchtreeClient(api.url) as archtree:
        yield archtree


def start_agents(agents, client: ArchtreeClient, device_class: str, count: int):
    """`count` agents of `device_class`; returns them with their device ids, once online."""
    started = [agents(device_class, claim_idle_ms=CLAIM_IDLE_MS) for _ in range(count)]

    def online() -> list[str]:
        devices = client.devices()["devices"]
        return [d["id"] for d in devices if d["device_class"] == device_class and d["online"]]

    wait_until(lambda: len(online()) == count, AGENT_START_S, f"{count} agents online")
    return started, online()


def measurements_by_device(client: ArchtreeClient, ids: list[str]) -> dict[str, int]:
    return {d["id"]: d["measurements"] for d in client.devices()["devices"] if d["id"] in ids}


def follow(api: ApiProcess, job_id: str) -> tuple[threading.Thread, list[tuple[str, dict]]]:
    """Collect the job's SSE events in a thread, until the stream ends."""
    received: list[tuple[str, dict]] = []

    def run() -> None:
        with ArchtreeClient(api.url) as own:
            received.extend(own.events(job_id))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, received


def test_a_job_over_http_uses_both_agents_and_survives_losing_one(
    api: ApiProcess, client: ArchtreeClient, agents, worker_pool: WorkerPool, tmp_path: Path
):
    started, device_ids = start_agents(agents, client, "svc-a", 2)
    workers = {worker.name for worker in worker_pool.alive()}

    def all_workers_ready() -> bool:
        ready = client.http.get("/readyz").json()
        return set(ready["workers"]) == workers and ready["detail"] is None

    wait_until(all_workers_ready, 30, "/readyz")
    job_id = client.submit(job_spec("svc-a"))["id"]
    thread, events = follow(api, job_id)

    def both_measured_or_ended() -> str | None:
        if client.job(job_id)["status"] in FINAL_STATUSES:
            return "ended"
        measured = measurements_by_device(client, device_ids).values()
        return "measured" if all(n > 0 for n in measured) else None

    # Both agents take measurements (per-device counters the workers' oracles keep)...
    outcome = wait_until(both_measured_or_ended, JOB_S, "measurements by both agents")
    assert outcome == "measured", f"{client.job(job_id)['error']}\n{worker_pool.logs()}"
    # The untrained VGG scores at chance: the job says so while it runs, not only at its end.
    running = client.job(job_id)
    assert running["status"] == "running"
    assert "on the calibration split, no better than" in running["progress"]["notes"][0]
    # ...then one dies mid-job: the other takes its requests over.
    started[0].kill()
    thread.join(JOB_S)

    job = client.job(job_id)
    assert not thread.is_alive(), "the event stream did not end with the job"
    assert job["status"] == "succeeded", f"{job['error']}\n{worker_pool.logs()}"
    client.fetch(job_id, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report) == REPORT_KEYS
    assert report["final"]["latency_ms"] <= report["budget_ms"]
    assert job["progress"]["notes"] == report["notes"]
    assert NOTHING_PRUNED not in report["notes"]
    assert load_pruned(tmp_path)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    # The report names both agents that measured for the job, with their counts.
    by_agent = report["device"]["agents"]
    assert set(by_agent) == set(device_ids), by_agent
    assert sum(by_agent.values()) >= report["search"]["latency_measurements"]

    # The SSE stream delivered the job's events in order, ending with its final status.
    ids = [event_id for event_id, _ in events]
    kinds = [event["kind"] for _, event in events]
    assert ids == sorted(set(ids), key=lambda i: tuple(map(int, i.split("-"))))  # unique, in order
    assert {"queued", "baseline", "depth_started", "node", "depth_done"} <= set(kinds)
    assert (events[-1][1]["kind"], events[-1][1]["status"]) == ("status", "succeeded")
    resumed = list(client.events(job_id, after=ids[2]))
    assert [event_id for event_id, _ in resumed] == ids[3:]

    tree = client.tree(job_id)
    assert tree["done"] and tree["budget_ms"] == pytest.approx(report["budget_ms"])
    assert {node["id"] for node in tree["nodes"]} == {node["id"] for node in report["tree"]}
    assert set(tree["frontier"]) <= {node["id"] for node in tree["nodes"]}
    metrics = client.http.get("/metrics").text
    taken = re.search(r'archtree_measurements_total\{device_class="svc-a"\} (\S+)', metrics)
    assert taken and float(taken.group(1)) >= report["search"]["latency_measurements"]
    assert 'archtree_measurement_round_trip_seconds_count{device_class="svc-a"}' in metrics


def test_cancel_stops_a_running_job(client: ArchtreeClient, agents, worker_pool: WorkerPool):
    start_agents(agents, client, "svc-b", 1)
    job_id = client.submit(job_spec("svc-b", planned_steps=3))["id"]
    stream = client.events(job_id)
    started = next((e for _, e in stream if e["kind"] == "depth_started"), None)
    assert started, f"{client.job(job_id)['error']}\n{worker_pool.logs()}"

    asked = time.monotonic()
    assert client.cancel(job_id)["cancel_requested"]
    rest = [event for _, event in stream]

    assert rest[-1]["kind"] == "status" and rest[-1]["status"] == "cancelled", worker_pool.logs()
    assert time.monotonic() - asked < 30
    assert client.job(job_id)["status"] == "cancelled"
    missing = client.http.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
    assert missing.status_code == 404 and "ended cancelled" in missing.json()["detail"]


def test_a_budget_the_unpruned_model_meets_says_so_in_the_job_and_its_report(
    api: ApiProcess, client: ArchtreeClient, agents, tmp_path: Path
):
    start_agents(agents, client, "svc-e", 1)
    # Greedy with a width: the width is not used, which the job says from its submission on.
    spec = job_spec("svc-e", strategy="greedy", width=3)
    job_id = client.submit({**spec, "budget": "1000ms"})["id"]
    overridden = "search.width 3 is not used: search.strategy greedy runs with 1"
    assert client.job(job_id)["progress"]["notes"] == [overridden]
    wait_until(lambda: client.job(job_id)["status"] in FINAL_STATUSES, JOB_S, "the job")
    job = client.job(job_id)
    assert job["status"] == "succeeded", job["error"]
    notes = job["progress"]["notes"]
    assert notes[0] == overridden and notes[-1] == NOTHING_PRUNED
    # report.json holds the same notes, named as the spec names its fields...
    client.fetch(job_id, tmp_path / "api")
    assert json.loads((tmp_path / "api" / "report.json").read_text())["notes"] == notes
    shown = archtree("status", job_id, "--api", api.url)
    assert shown.returncode == 0 and f"note: {NOTHING_PRUNED}" in shown.stdout
    final = job["progress"]["final"]
    assert (
        f"final: {final['id']} at {final['latency_ms']:.3f} ms, accuracy "
        f"{final['accuracy']:.4f} (validation)" in shown.stdout
    ), shown.stdout
    # ...and, fetched with the command line, as its options.
    fetched = archtree("fetch", job_id, "--api", api.url, "--out", str(tmp_path / "cli"))
    assert fetched.returncode == 0, fetched.stderr
    in_options = "--width 3 is not used: --strategy greedy runs with 1"
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["notes"][0] == in_options
    assert f"note: {in_options}" in fetched.stdout


def archtree(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_submit_status_watch_and_fetch_from_the_command_line(
    api: ApiProcess, client: ArchtreeClient, agents, tmp_path: Path
):
    start_agents(agents, client, "svc-c", 2)
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    save_weights(inputs.model, tmp_path / "vgg.safetensors")
    splits = inputs.data
    np.savez(
        tmp_path / "digits.npz",
        x=torch.cat([splits.train_x, splits.calib_x, splits.val_x]).numpy(),
        y=torch.cat([splits.train_y, splits.calib_y, splits.val_y]).numpy(),
    )
    common = ["--api", api.url]

    submitted = archtree(
        "submit", *common, "--device-class", "svc-c", "--model", "builtin:vgg",
        "--weights", str(tmp_path / "vgg.safetensors"), "--data", str(tmp_path / "digits.npz"),
        "--budget", BUDGET, *CLI_SEARCH, "--moves", "global,uniform", "--margin", "0.04",
        "--select-top", "2",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert "no agent" not in submitted.stderr  # its agents are online
    job_id = submitted.stdout.strip()
    spec = client.job(job_id)["spec"]
    assert spec["data"] == f"artifact:jobs/{job_id}/inputs/data.npz"
    assert spec["search"]["move_kinds"] == ["global", "uniform"]
    assert (spec["search"]["margin"], spec["search"]["select_top"]) == (0.04, 2)

    watched = archtree("status", job_id, *common, "--watch", timeout_s=JOB_S)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "depth 1 done" in watched.stdout and "status succeeded" in watched.stdout
    assert f"job {job_id} succeeded" in watched.stdout

    out = tmp_path / "pruned"
    fetched = archtree("fetch", job_id, *common, "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(path.name for path in out.iterdir()) == sorted(ARTIFACT_NAMES)
    assert load_pruned(out)(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert set(json.loads((out / "report.json").read_text())) == REPORT_KEYS

    source = ["--model", "builtin:nope", "--data", "builtin:digits", "--budget", "60%"]
    refused = archtree("submit", *common, *source)
    assert refused.returncode == 2 and "unknown builtin model 'nope'" in refused.stderr
    weights = archtree("submit", *common, "--model", "resnet.pt", *source[2:])
    assert weights.returncode == 2
    assert "as --model (builtin:NAME" in weights.stderr
    assert "the weights file as --weights" in weights.stderr
    # The service's limits and hints, in the options and commands of the command line (its
    # bounds of a search are the command line's own: refused before anything is sent).
    vgg = ["--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%"]
    too_wide = archtree("submit", *common, *vgg, "--width", "100")
    assert too_wide.returncode == 2
    assert "--width must be at most 64, far wider than any useful tree" in too_wide.stderr
    unknown = archtree("status", "0123456789ab", *common)
    assert unknown.returncode == 2
    assert f"list the jobs with `archtree jobs --api {api.url}`" in unknown.stderr
    down = archtree("status", job_id, "--api", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2
    assert "cannot reach the API at" in down.stderr and "archtree up" in down.stderr


def test_options_the_strategy_overrides_are_the_jobs_notes_when_submitted_from_the_command_line(
    api: ApiProcess, client: ArchtreeClient
):
    submitted = archtree(
        "submit", "--api", api.url, "--device-class", "svc-notes", "--model", "builtin:vgg",
        "--data", "builtin:digits", "--budget", BUDGET, "--strategy", "greedy", "--width", "3",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    try:
        assert "archtree: note: --width 3 is not used: --strategy greedy" in submitted.stderr
        notes = client.job(job_id)["progress"]["notes"]
        assert (notes or [])[:1] == [
            "search.width 3 is not used: search.strategy greedy runs with 1"
        ]
        shown = archtree("status", job_id, "--api", api.url)
        assert "note: --width 3 is not used: --strategy greedy runs with 1" in shown.stdout
    finally:
        with contextlib.suppress(ArchtreeError):  # it may have ended, waiting for its device
            client.cancel(job_id)


def test_status_and_jobs_name_uploaded_weights_and_data_as_the_user_named_them(
    api: ApiProcess, client: ArchtreeClient, tmp_path: Path
):
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    data = inputs.data
    np.savez(tmp_path / "my digits.npz", x=data.train_x.numpy(), y=data.train_y.numpy())
    save_weights(inputs.model, tmp_path / "trained vgg.safetensors")
    common = ["--api", api.url]
    submitted = archtree(
        "submit", *common, "--device-class", "svc-upload", "--model", "builtin:vgg",
        "--weights", str(tmp_path / "trained vgg.safetensors"),
        "--data", str(tmp_path / "my digits.npz"), "--budget", BUDGET,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    said = (
        "builtin:vgg with weights trained vgg.safetensors (uploaded) on my digits.npz (uploaded), "
        "budget"
    )
    try:
        shown = archtree("status", job_id, *common)
        assert f"job {job_id} " in shown.stdout, shown.stderr
        assert said in shown.stdout
        listed = archtree("jobs", *common)
        line = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
        assert said in line and "artifact:" not in line
    finally:
        with contextlib.suppress(ArchtreeError):  # it may have ended, waiting for its device
            client.cancel(job_id)


def test_a_worker_lost_mid_job_is_named_by_the_api_status_and_events_until_another_takes_over(
    api: ApiProcess, client: ArchtreeClient, agents, worker_pool: WorkerPool
):
    worker_pool.ensure(2)
    start_agents(agents, client, "svc-lost", 1)
    # Small steps, so that the search surely has a child to kill a worker in.
    job_id = client.submit(job_spec("svc-lost", planned_steps=4, max_probes=4))["id"]
    thread, events = follow(api, job_id)

    victim, _ = worker_pool.kill_one_running_a_child(job_id)
    # As if it died holding the lock workers take to put lost tasks back: the lock lasts as
    # long as the workers are told it may, and the task goes back once it has expired.
    options = celery_config(worker_pool.settings)["broker_transport_options"]
    expire_s = options.get("unacked_mutex_expire", 300)  # kombu's own: 5 minutes
    with redis.Redis.from_url(worker_pool.settings.redis_url) as broker:
        broker.set("unacked_mutex", "killed-holder", ex=expire_s)

    def lost() -> dict[str, Any] | None:
        tasks = client.job(job_id)["lost_tasks"]
        return next((task for task in tasks if task["worker"] == victim.name), None)

    task = wait_until(lost, 30, "the killed worker's task lost in the job")
    assert task["name"] == "archtree.evaluate_child"
    assert task["silent_s"] >= worker_pool.settings.task_lease_s
    assert task["back_by"] > task["started_at"] + worker_pool.settings.visibility_timeout_s
    status = archtree("status", job_id, "--api", api.url)
    assert status.returncode == 0, status.stderr
    said = f"lost: worker {victim.name} stopped answering in evaluate_child"
    assert said in status.stdout and "another worker takes the task by about" in status.stdout

    worker_pool.start(1)
    thread.join(JOB_S)
    job = client.job(job_id)
    assert job["status"] == "succeeded", f"{job['error']}\n{worker_pool.logs()}"
    assert job["lost_tasks"] == []
    announced = [e for _, e in events if e["kind"] == "task_lost" and e["worker"] == victim.name]
    assert [e["task_id"] for e in announced] == [task["task_id"]]  # said once
    # `status --watch` replays the events: the loss is one line among them.
    watched = archtree("status", job_id, "--api", api.url, "--watch")
    assert watched.stdout.count(said) == 1, watched.stdout
    # It ends with the job's summary, the best candidate's score and the answer's accuracy.
    best, final = job["progress"]["best"], job["progress"]["final"]
    assert f"{best['id']} {best['latency_ms']:.3f} ms, score {best['score']:.4f}" in watched.stdout
    assert f", accuracy {final['accuracy']:.4f} (validation)" in watched.stdout


def test_a_waiting_job_from_the_command_line_status_jobs_and_cancel(
    api: ApiProcess, client: ArchtreeClient, worker_pool: WorkerPool
):
    common = ["--api", api.url]
    hint = f"start one with `archtree agent --api {api.url} --device-class svc-absent`"
    # A long device wait, so that the job is still waiting when looked at.
    with worker_pool.reconfigured(ARCHTREE_DEVICE_WAIT_S="300"):
        worker_pool.ensure(1)
        submitted = archtree(
            "submit", *common, "--device-class", "svc-absent", "--model", "builtin:vgg",
            "--data", "builtin:digits", "--budget", BUDGET, *CLI_SEARCH,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stdout.strip()
        assert "warning: no agent of device class svc-absent is online" in submitted.stderr
        watch = subprocess.Popen(
            [sys.executable, "-m", "archtree_cli.main", "status", job_id, *common, "--watch"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            lines = read_lines(watch.stdout)
            line = lines.get(timeout=60)
            while not line.startswith("status waiting_for_device"):
                line = lines.get(timeout=60)
            assert "no agent of device class svc-absent is online" in line and hint in line

            shown = archtree("status", job_id, *common)
            assert shown.returncode == 0
            assert f"job {job_id} waiting_for_device" in shown.stdout and hint in shown.stdout
            # When it fails if no agent comes: the device wait (300 s) after it began.
            until = client.job(job_id)["progress"]["device_wait_until"]
            since = client.job(job_id)["progress"]["device_wait_since"]
            assert until == pytest.approx(since + 300)
            clock = time.strftime("%H:%M:%S", time.localtime(until))
            assert f"{hint}; the job fails if none is online by {clock}\n" in shown.stdout
            # Ctrl-C stops the watch, not the job: it says so, and how to stop the job.
            watch.send_signal(signal.SIGINT)
            assert watch.wait(timeout=60) == 130
        finally:
            watch.kill()
        stderr = watch.stderr.read()
        assert f"job {job_id} goes on on the service" in stderr
        assert f"stop it with `archtree cancel {job_id} --api {api.url}`" in stderr
        listed = archtree("jobs", *common)
        assert listed.returncode == 0
        assert any(
            line.split()[:2] == [job_id, "waiting_for_device"]
            for line in listed.stdout.splitlines()
        ), listed.stdout
        # Only the jobs in a status, as the API lists them.
        waiting = archtree("jobs", *common, "--status", "waiting_for_device", "--limit", "200")
        expected = client.jobs(limit=200, statuses=["waiting_for_device"])["jobs"]
        assert [line.split()[0] for line in waiting.stdout.splitlines()] == [
            job["id"] for job in expected
        ]
        assert job_id in waiting.stdout
        none = archtree("jobs", *common, "--status", "succeeded", "--status", "waiting_for_device")
        assert job_id in none.stdout
        assert "succeeded" not in archtree("jobs", *common, "--status", "failed").stdout
        bad = archtree("jobs", *common, "--status", "done")
        assert bad.returncode == 2 and "invalid choice: 'done'" in bad.stderr
        # Past the newest 200 (the most one page holds), --offset pages on.
        total = client.jobs(limit=1)["total"]
        oldest = archtree("jobs", *common, "--limit", "1", "--offset", str(total - 1))
        assert oldest.stdout.split()[0] == client.jobs(offset=total - 1, limit=1)["jobs"][0]["id"]
        # (Said from the second page on; this test run alone has made one job.)
        said = f"(jobs {total}-{total} of {total}, newest first)\n" if total > 1 else ""
        assert oldest.stderr == said
        past = archtree("jobs", *common, "--offset", str(total))
        assert past.returncode == 0 and not past.stdout, past.stderr
        assert f"no jobs past the {total} there are: lower --offset" in past.stderr

        running = archtree("delete", job_id, *common)
        assert running.returncode == 2 and running.stderr == (
            f"archtree: error: job {job_id} has not ended (waiting_for_device): stop it with "
            f"`archtree cancel {job_id} --api {api.url}`, then delete it once it has ended\n"
        )
        cancelled = archtree("cancel", job_id, *common)
        assert cancelled.returncode == 0 and job_id in cancelled.stdout, cancelled.stderr
        wait_until(lambda: client.job(job_id)["status"] == "cancelled", 60, "the cancel")
        again = archtree("cancel", job_id, *common)
        assert again.returncode == 2 and "has already ended (cancelled)" in again.stderr
        # Its history, watched once it has ended, says it waited, not to start an agent now.
        replayed = archtree("status", job_id, *common, "--watch")
        assert "status waiting_for_device\n" in replayed.stdout, replayed.stdout
        assert "start one with" not in replayed.stdout
        # Once ended, it can be deleted: it is gone from the service.
        deleted = archtree("delete", f" {job_id} ", *common)
        assert deleted.returncode == 0, deleted.stderr
        assert deleted.stdout == (
            f"job {job_id} deleted, with its uploads, result files and events\n"
        )
        assert job_id not in archtree("jobs", *common, "--limit", "200").stdout
        gone = archtree("delete", job_id, *common)
        assert gone.returncode == 2 and gone.stderr.count("\n") == 1
        assert f"no job '{job_id}': list the jobs with `archtree jobs --api {api.url}`" in (
            gone.stderr
        )
    worker_pool.ensure(2)  # as the module's other tests expect


def read_lines(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


def up_env(home: Path) -> dict[str, str]:
    """The environment of an `archtree up` on its own home, with its embedded Redis."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ARCHTREE_HOME": str(home),
    }
    for name in ("ARCHTREE_REDIS_URL", "REDIS_URL", "ARCHTREE_ARTIFACTS_URL"):
        env.pop(name, None)
    return env


def start_up(tmp_path: Path, port: str, **env: str) -> subprocess.Popen[str]:
    """`archtree up --port PORT` with its home in tmp_path/home, stderr in tmp_path/up.log;
    `env`: more environment variables."""
    command = [sys.executable, "-m", "archtree_cli.main", "up", "--port", port]
    with open(tmp_path / "up.log", "wb") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env={**up_env(tmp_path / "home"), **env},
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )


def stop_up(up: subprocess.Popen[str], tmp_path: Path) -> None:
    """Stop `archtree up` as a service manager does, with SIGTERM: it exits 0."""
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0, (tmp_path / "up.log").read_text()


def kill_if_running(up: subprocess.Popen[str]) -> None:
    """Kill an `archtree up` a failed test left running."""
    if up.poll() is None:
        up.kill()
        up.wait()


def test_archtree_up_serves_then_stops_all_its_children_on_sigterm(tmp_path: Path):
    # The packages the service builds module: sources of: its own agent builds them too,
    # or no such job could be timed on one machine.
    up = start_up(tmp_path, str(free_port()), ARCHTREE_ALLOWED_MODULES="tests")
    try:
        lines = read_lines(up.stdout)
        line = lines.get(timeout=120)
        url = re.search(r"API at (\S+)", line).group(1)
        with ArchtreeClient(url) as running:
            assert running.http.get("/healthz").json() == {"status": "ok"}
            wait_until(lambda: running.devices()["devices"], AGENT_START_S, "the local agent")
            (device,) = running.devices()["devices"]
            assert (device["device_class"], device["allowed_modules"]) == ("local", ["tests"])
            spec = {"model": "module:tests.odd_models:group_norm_net", "data": "builtin:digits",
                    "budget": "60%", "device_class": "local"}  # fmt: skip
            submitted = running.http.post("/v1/jobs", data={"spec": json.dumps(spec)})
            assert submitted.status_code == 202, submitted.text
            running.http.post(f"/v1/jobs/{submitted.json()['id']}/cancel")
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4  # redis, api, worker (and its pool), agent

        stop_up(up, tmp_path)
        wait_until(lambda: not [c for c in children if _alive(c)], 30, "all children gone")
    finally:
        kill_if_running(up)


def test_archtree_up_goes_on_when_its_agent_stops_because_its_device_was_deleted(
    tmp_path: Path,
):
    up = start_up(tmp_path, str(free_port()))
    try:
        url = re.search(r"API at (\S+)", read_lines(up.stdout).get(timeout=120)).group(1)
        with ArchtreeClient(url) as running:
            wait_until(lambda: running.devices()["devices"], AGENT_START_S, "the local agent")
            (device,) = running.devices()["devices"]
            assert running.http.delete(f"/v1/devices/{device['id']}").status_code == 204

            said = "archtree up: the local agent stopped (code 0: its device was deleted"
            wait_until(lambda: said in (tmp_path / "up.log").read_text(), 60, "the agent's stop")
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            assert running.http.get("/healthz").json() == {"status": "ok"}
            line = next(
                line for line in (tmp_path / "up.log").read_text().splitlines() if said in line
            )
            assert f"start one with `archtree agent --api {url} --device-class local`" in line

        stop_up(up, tmp_path)
    finally:
        kill_if_running(up)


def test_archtree_up_refuses_what_it_cannot_run_before_starting_anything(
    tmp_path: Path, redis_url: str
):
    env = up_env(tmp_path / "home")
    for workers in ("65", "1000"):
        refused = archtree("up", "--port", str(free_port()), "--workers", workers, env=env)
        assert refused.returncode == 2
        assert f"--workers must be from 1 to 64, got {workers}" in refused.stderr
    # A Redis that does not answer is said at once, naming the variable, never its password.
    closed = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    down = archtree("up", "--port", str(free_port()), env={**env, "ARCHTREE_REDIS_URL": closed})
    assert down.returncode == 2, down.stderr
    (line,) = down.stderr.strip().splitlines()
    assert line.startswith(
        f"archtree: error: cannot reach Redis at {closed.replace('hunter2', '***')}"
    )
    assert "(ARCHTREE_REDIS_URL;" in line and "hunter2" not in down.stderr
    # A rediss:// URL of a Redis without TLS is said to be so, not waited out as unreachable.
    plain = redis_url.replace("redis://", "redis://:hunter2@", 1)
    tls = plain.replace("redis://", "rediss://", 1)
    refused = archtree("up", "--port", str(free_port()), env={**env, "ARCHTREE_REDIS_URL": tls})
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == (
        f"archtree: error: Redis at {tls.replace('hunter2', '***')} (ARCHTREE_REDIS_URL) does "
        f"not speak TLS: it answered in plain Redis; give {plain.replace('hunter2', '***')} "
        "instead, or turn TLS on in that Redis"
    )
    # A worker that could not write its files would fail every task: refused before the API.
    scratch = {**env, "ARCHTREE_WORK_DIR": "/proc/version/work"}
    refused = archtree("up", "--port", str(free_port()), env=scratch)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("archtree: error: cannot write to ARCHTREE_WORK_DIR")
    assert len(refused.stderr.splitlines()) == 1
    empty = archtree("up", "--host", "", "--port", str(free_port()), env=env)
    assert empty.returncode == 2 and "--host: is empty: give an address" in empty.stderr
    assert not (tmp_path / "home" / "up" / "logs" / "api.log").exists()


def test_the_api_url_of_archtree_up_reaches_the_address_it_listens_on():
    from archtree_cli.service_commands import local_api_url

    assert local_api_url("0.0.0.0", 8000) == "http://127.0.0.1:8000"
    assert local_api_url("::", 8000) == "http://127.0.0.1:8000"
    assert local_api_url("::1", 8713) == "http://[::1]:8713"
    assert local_api_url("10.0.0.5", 80) == "http://10.0.0.5:80"


def test_a_second_archtree_up_is_refused_and_a_killed_one_leaves_no_children(tmp_path: Path):
    port = str(free_port())
    up = start_up(tmp_path, port)
    env = up_env(tmp_path / "home")
    try:
        assert "API at" in read_lines(up.stdout).get(timeout=120)
        first_log = (tmp_path / "home" / "up" / "logs" / "api.log").read_bytes()

        again = archtree("up", "--port", str(free_port()), env=env)
        assert again.returncode == 2
        assert "another `archtree up` is running on" in again.stderr
        same_port = archtree("up", "--port", port, env=up_env(tmp_path / "other"))
        assert same_port.returncode == 2
        assert f"port {port} on 127.0.0.1 is taken" in same_port.stderr
        # Refused before starting anything: the first one's logs are untouched.
        assert (tmp_path / "home" / "up" / "logs" / "api.log").read_bytes()[: len(first_log)] == (
            first_log
        )

        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 4
        up.kill()  # no chance to stop its children itself
        up.wait()
        wait_until(lambda: not [c for c in children if _alive(c)], 60, "all children gone")

        # Nor to remove its Redis socket's folder: the next `up` on this home does.
        stale = Path((tmp_path / "home" / "up" / "socket-dir").read_text())
        assert stale.is_dir()
        up = start_up(tmp_path, port)
        assert "API at" in read_lines(up.stdout).get(timeout=120)
        assert not stale.exists()
        current = Path((tmp_path / "home" / "up" / "socket-dir").read_text())
        stop_up(up, tmp_path)
        assert not current.exists()
    finally:
        kill_if_running(up)


def test_archtree_up_killed_mid_job_leaves_nothing_running_and_the_next_keeps_its_logs(
    tmp_path: Path,
):
    """...and puts the task the killed worker held back on its queue within leases of its
    start, whether the task had begun its step or only arrived, not once the visibility
    timeout (300 s) has passed."""
    port = str(free_port())
    lease = {"ARCHTREE_TASK_LEASE_S": "3"}  # the task back within seconds
    # Two API processes: uvicorn's own children, which nothing but `up` stops.
    up = start_up(tmp_path, port, ARCHTREE_API_WORKERS="2", **lease)
    logs = tmp_path / "home" / "up" / "logs"
    descendants: list[psutil.Process] = []
    evaluating = re.compile(r"Task archtree\.evaluate_child\[([0-9a-f-]+)\] received")
    try:
        url = re.search(r"API at (\S+)", read_lines(up.stdout).get(timeout=120)).group(1)
        with ArchtreeClient(url) as running:
            wait_until(lambda: running.devices()["devices"], AGENT_START_S, "the local agent")
            # Children fine-tuned long enough that the worker is killed holding one.
            job_id = running.submit(job_spec("local", ft_steps=20_000))["id"]
            wait_until(lambda: running.job(job_id)["status"] != "queued", JOB_S, "the job")
            streaming = hold_events(url, job_id)
            wait_until(streaming.is_set, 30, "the job's event stream")
            wait_until(
                lambda: evaluating.search((logs / "worker.log").read_text()), JOB_S, "a child"
            )
            assert running.job(job_id)["status"] == "running"
        (held, *_) = evaluating.findall((logs / "worker.log").read_text())
        descendants = psutil.Process(up.pid).children(recursive=True)
        workers = [p for p in descendants if "worker" in p.cmdline()]
        assert len(workers) >= 2  # the worker and its pool process
        api = next(p for p in descendants if "api" in p.cmdline())
        assert len(api.children()) >= 2

        up.kill()  # with a job running and a client on its event stream
        up.wait()

        wait_until(lambda: not [p for p in descendants if _alive(p)], 20, "all descendants gone")
        first_run = {path.name: path.read_bytes() for path in logs.glob("*.log")}
        assert set(first_run) == {"redis.log", "api.log", "worker.log", "agent.log"}
        # The next `up` on the same home and port starts; the previous run's logs are kept.
        up = start_up(tmp_path, port, **lease)
        assert "API at" in read_lines(up.stdout).get(timeout=120)
        for name, content in first_run.items():
            assert (logs / f"{name}.1").read_bytes() == content, name
        # Back on its queue, whether it had taken its lease or not. (The new worker may be
        # busy with another child meanwhile: it takes the task once that one is done.)
        handed_back = re.compile(rf"task {held}: .*; handed back to its queue")
        wait_until(
            lambda: handed_back.search((logs / "worker.log").read_text()),
            60,
            "the killed worker's task handed back",
        )
        stop_up(up, tmp_path)
    finally:
        kill_if_running(up)
        for process in descendants:  # none, unless the test failed
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_archtree_up_stopped_mid_task_logs_no_error_and_the_next_up_runs_the_task_again(
    tmp_path: Path,
):
    port = str(free_port())
    worker_log = tmp_path / "home" / "up" / "logs" / "worker.log"
    up = start_up(tmp_path, port)
    try:
        url = re.search(r"API at (\S+)", read_lines(up.stdout).get(timeout=120)).group(1)
        with ArchtreeClient(url) as running:
            wait_until(lambda: running.devices()["devices"], AGENT_START_S, "the local agent")
            # Children fine-tuned long enough to be stopped part way.
            running.submit(job_spec("local", ft_steps=20_000))
            evaluating = re.compile(r"Task archtree\.evaluate_child\[([0-9a-f-]+)\] received")
            wait_until(lambda: evaluating.search(worker_log.read_text()), JOB_S, "a child task")
        (task,) = evaluating.findall(worker_log.read_text())
        stop_up(up, tmp_path)
        stopped = worker_log.read_text()
        assert "Traceback" not in stopped and "ERROR" not in stopped, stopped
        assert f"archtree.evaluate_child[{task}] succeeded" not in stopped

        up = start_up(tmp_path, port)
        assert "API at" in read_lines(up.stdout).get(timeout=120)
        again = f"Task archtree.evaluate_child[{task}] received"
        wait_until(lambda: again in worker_log.read_text(), 60, "the task run again")
        stop_up(up, tmp_path)
    finally:
        kill_if_running(up)


def hold_events(url: str, job_id: str) -> threading.Event:
    """Hold the job's event stream open in a thread, until the API ends it; the event is set
    once the first event has arrived."""
    streaming = threading.Event()

    def run() -> None:
        events = f"{url}/v1/jobs/{job_id}/events"
        with (
            contextlib.suppress(httpx.HTTPError),
            httpx.stream("GET", events, timeout=60) as answer,
        ):
            for _ in answer.iter_lines():
                streaming.set()

    threading.Thread(target=run, daemon=True).start()
    return streaming


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def compose_client() -> list[str] | None:
    """`docker compose` (v2) or `docker-compose` (v1), whichever is installed."""
    if shutil.which("docker"):
        version = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if version.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_the_compose_file_is_valid_with_scalable_workers_and_persistent_redis():
    compose = compose_client()
    if compose is None:
        pytest.skip("no docker compose client on this machine")
    command = [*compose, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]

    services = subprocess.run([*command, "config", "--services"], capture_output=True, text=True)
    config = subprocess.run([*command, "config"], capture_output=True, text=True)
    # The API's process count, as documented, comes from the caller's environment.
    env = {**os.environ, "ARCHTREE_API_WORKERS": "3"}
    scaled = subprocess.run([*command, "config"], capture_output=True, text=True, env=env)

    assert services.returncode == 0, services.stderr
    assert set(services.stdout.split()) == {"redis", "api", "worker", "agent"}
    assert config.returncode == 0, config.stderr
    assert "container_name" not in config.stdout  # `up --scale worker=3` needs distinct names
    assert "--appendonly" in config.stdout and "redis-data" in config.stdout
    assert config.stdout.count("image: archtree:latest") == 3
    assert scaled.returncode == 0, scaled.stderr
    assert re.findall(r"ARCHTREE_API_WORKERS: ['\"]?(\d+)", scaled.stdout) == ["3"]
    # The API's own environment still holds the settings every service shares.
    assert scaled.stdout.count("ARCHTREE_REDIS_URL: redis://redis:6379/0") == 3
