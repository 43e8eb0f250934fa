"""The HTTP API as a real uvicorn process on a private Redis: submission checks, upload limits,
job resources, devices with real agent processes, health and metrics. No workers run here."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from search.inputs import load_inputs
from search.model_source import save_weights
from tests.api_fixtures import (
    MAX_DATA_BYTES,
    MAX_WEIGHTS_BYTES,
    ApiProcess,
    api_env,
    free_port,
    start_api,
)
from tests.redis_fixtures import ROOT, wait_until

pytest_plugins = ["tests.redis_fixtures", "tests.api_fixtures"]

SPEC = {
    "model": "builtin:vgg",
    "data": "builtin:digits",
    "budget": "60%",
    "device_class": "api-cpu",
    "search": {"width": 2, "branching": 2, "ft_steps": 5, "planned_steps": 2, "max_probes": 3},
}
AGENT_START_S = 60.0


@pytest.fixture(scope="module", autouse=True)
def _no_jobs_left_queued(redis_url: str) -> Iterator[None]:
    """No worker runs here: the jobs this module queues are dropped, so that the workers of
    later modules never see them."""
    yield
    redis.Redis.from_url(redis_url).flushdb()


@pytest.fixture(scope="module")
def http(api_server: ApiProcess) -> Iterator[httpx.Client]:
    with api_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def uploads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Weights and data files, good and bad, as bytes."""
    inputs = load_inputs("builtin:vgg", "builtin:digits")
    folder = tmp_path_factory.mktemp("uploads")
    save_weights(inputs.model, folder / "vgg.safetensors")
    pickled = io.BytesIO()
    torch.save(inputs.model, pickled)
    data = io.BytesIO()
    x = torch.cat([inputs.data.train_x, inputs.data.calib_x, inputs.data.val_x]).numpy()
    y = torch.cat([inputs.data.train_y, inputs.data.calib_y, inputs.data.val_y]).numpy()
    np.savez(data, x=x, y=y)
    tiny = io.BytesIO()
    np.savez(tiny, x=np.zeros((100, 1, 1, 1), np.float32), y=np.arange(100) % 10)
    return {
        "weights": (folder / "vgg.safetensors").read_bytes(),
        "corrupt": os.urandom(4096),
        "pickled": pickled.getvalue(),
        "data": data.getvalue(),
        "tiny": tiny.getvalue(),
    }


def submit(http: httpx.Client, spec: dict[str, Any] | str, **files: tuple[str, bytes]):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return http.post("/v1/jobs", data={"spec": text}, files=files or None)


def job_total(http: httpx.Client) -> int:
    return http.get("/v1/jobs").json()["total"]


def stored_files(api: ApiProcess) -> list[Path]:
    return sorted(path for path in api.artifacts.rglob("*") if path.is_file())


def one_line_detail(answer: httpx.Response) -> str:
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


BAD_SUBMISSIONS = {
    "bad budget": ({"budget": "fast"}, {}, "Cannot read the budget 'fast'"),
    "unknown builtin": ({"model": "builtin:nope"}, {}, "unknown builtin model 'nope'"),
    "corrupt weights": ({}, {"weights": ("w.safetensors", "corrupt")}, "corrupt or truncated"),
    "pickled module": ({}, {"weights": ("model.pt", "pickled")}, "pickled whole model"),
    "data the model rejects": (
        {"data": None},
        {"data": ("tiny.npz", "tiny")},
        "rejects inputs of shape (1, 1, 1)",
    ),
    "bad device class": ({"device_class": "no spaces"}, {}, "invalid device class"),
    "bad search setting": ({"search": {"width": 0}}, {}, "--width must be at least 1"),
    "unknown move": (
        {"search": {"move_kinds": ["global", "sideways"]}},
        {},
        "unknown move 'sideways'",
    ),
    "unknown search setting": ({"search": {"widht": 2}}, {}, "search.widht"),
    "pickle not allowed": ({"allow_pickle": True}, {}, "does not load pickled weights"),
    "module source": ({"model": "module:os:getcwd"}, {}, "does not build 'module:os:getcwd'"),
    "data twice": ({}, {"data": ("d.npz", "data")}, "not both"),
    "data not npz": ({"data": None}, {"data": ("d.csv", "data")}, "must be a .npz or .pt"),
}


@pytest.mark.parametrize("case", BAD_SUBMISSIONS, ids=list(BAD_SUBMISSIONS))
def test_a_bad_submission_answers_422_in_one_line_and_creates_nothing(
    case: str, http: httpx.Client, api_server: ApiProcess, uploads: dict[str, bytes]
):
    changes, files, expected = BAD_SUBMISSIONS[case]
    spec = {key: value for key, value in {**SPEC, **changes}.items() if value is not None}
    before_jobs, before_files = job_total(http), stored_files(api_server)

    answer = submit(http, spec, **{k: (name, uploads[v]) for k, (name, v) in files.items()})

    assert answer.status_code == 422, answer.text
    detail = one_line_detail(answer)
    assert expected in detail
    assert "submission-" not in detail  # the API's temporary paths are not shown
    assert job_total(http) == before_jobs
    assert stored_files(api_server) == before_files


def test_a_spec_that_is_not_json_answers_422(http: httpx.Client):
    answer = submit(http, "{not json")

    assert answer.status_code == 422
    assert one_line_detail(answer).startswith("the job spec is not valid")


def test_an_oversized_weights_upload_answers_413_naming_the_limit(
    http: httpx.Client, api_server: ApiProcess
):
    before_jobs, before_files = job_total(http), stored_files(api_server)

    answer = submit(http, SPEC, weights=("big.safetensors", os.urandom(MAX_WEIGHTS_BYTES + 1)))

    assert answer.status_code == 413
    assert f"limit of {MAX_WEIGHTS_BYTES} bytes" in one_line_detail(answer)
    assert job_total(http) == before_jobs
    assert stored_files(api_server) == before_files


def test_an_oversized_upload_without_content_length_is_counted_while_streaming(
    http: httpx.Client, api_server: ApiProcess
):
    boundary = "archtree-test-boundary"
    spec = {**SPEC}
    del spec["data"]
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n'
        f"{json.dumps(spec)}\r\n--{boundary}\r\n"
        'Content-Disposition: form-data; name="data"; filename="big.npz"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()

    def body() -> Iterator[bytes]:  # a generator: sent chunked, no Content-Length
        yield head
        for _ in range(MAX_DATA_BYTES // 65536 + 2):
            yield os.urandom(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    before_jobs, before_files = job_total(http), stored_files(api_server)
    answer = http.post(
        "/v1/jobs",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )

    assert answer.status_code == 413
    assert answer.request.headers.get("content-length") is None
    assert f"limit of {MAX_DATA_BYTES} bytes" in one_line_detail(answer)
    assert job_total(http) == before_jobs
    assert stored_files(api_server) == before_files


def test_a_job_with_uploads_is_queued_and_its_resources_answer(
    http: httpx.Client, api_server: ApiProcess, uploads: dict[str, bytes]
):
    spec = {key: value for key, value in SPEC.items() if key != "data"}
    answer = submit(
        http,
        spec,
        weights=("vgg.safetensors", uploads["weights"]),
        data=("digits.npz", uploads["data"]),
    )

    assert answer.status_code == 202, answer.text
    created = answer.json()
    job_id = created["id"]
    assert created["status"] == "queued"
    assert created["links"]["events"] == f"/v1/jobs/{job_id}/events"
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["spec"]["data"] == f"artifact:jobs/{job_id}/inputs/data.npz"
    assert job["spec"]["weights"] == f"artifact:jobs/{job_id}/inputs/weights.safetensors"
    assert job["spec"]["search"] == SPEC["search"]
    inputs = api_server.artifacts / "jobs" / job_id / "inputs"
    assert (inputs / "weights.safetensors").read_bytes() == uploads["weights"]
    assert (inputs / "data.npz").read_bytes() == uploads["data"]

    tree = http.get(f"/v1/jobs/{job_id}/tree").json()
    assert tree["nodes"] == [] and tree["frontier"] == [] and tree["budget_ms"] is None
    missing = http.get(f"/v1/jobs/{job_id}/artifacts/report.json")
    assert missing.status_code == 404
    assert "no report.json yet: it is queued" in one_line_detail(missing)
    assert http.get(f"/v1/jobs/{job_id}/artifacts/secrets.txt").status_code == 404

    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kinds = []
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kinds.append(line.removeprefix("event: "))
            if len(kinds) == 2:
                break
    assert kinds == ["queued", "cancel_requested"]


def test_unknown_jobs_answer_404_with_a_message(http: httpx.Client):
    for method, path in [
        ("GET", "/v1/jobs/nosuchjob"),
        ("GET", "/v1/jobs/nosuchjob/tree"),
        ("GET", "/v1/jobs/nosuchjob/events"),
        ("POST", "/v1/jobs/nosuchjob/cancel"),
        ("GET", "/v1/jobs/nosuchjob/artifacts/report.json"),
    ]:
        answer = http.request(method, path)
        assert answer.status_code == 404, path
        assert "no job 'nosuchjob'" in one_line_detail(answer)


def test_jobs_are_listed_newest_first_in_pages(http: httpx.Client):
    created = [submit(http, SPEC).json()["id"] for _ in range(3)]

    first = http.get("/v1/jobs", params={"limit": 2}).json()
    second = http.get("/v1/jobs", params={"offset": 2, "limit": 2}).json()

    assert [job["id"] for job in first["jobs"]] == created[::-1][:2]
    assert second["jobs"][0]["id"] == created[0]
    assert first["total"] == second["total"] >= 3
    bad = http.get("/v1/jobs", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in one_line_detail(bad)


def start_cli_agent(api: ApiProcess, device_class: str, log_dir: Path) -> subprocess.Popen:
    """`archtree agent --api URL --device-class NAME` as a child process."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "archtree_cli.main", "agent", "--api", api.url]
    with open(log_dir / f"agent-{len(list(log_dir.iterdir()))}.log", "wb") as log:
        return subprocess.Popen(
            [*command, "--device-class", device_class],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def test_agents_register_are_listed_online_and_are_deleted(
    http: httpx.Client, api_server: ApiProcess, tmp_path: Path
):
    agents = [start_cli_agent(api_server, "api-cpu", tmp_path) for _ in range(2)]
    try:

        def online() -> list[dict[str, Any]]:
            devices = http.get("/v1/devices").json()["devices"]
            return [d for d in devices if d["device_class"] == "api-cpu" and d["online"]]

        registered = wait_until(lambda: len(online()) == 2 and online(), AGENT_START_S, "agents")
        assert {d["runtime"] for d in registered} == {"torch"}
        assert all(d["runtime_version"] == torch.__version__ for d in registered)
        assert http.get("/v1/devices").json()["queue_depth"]["api-cpu"] == 0
        assert http.get("/readyz").json()["agents_online"]["api-cpu"] == 2

        # Deleting a device stops its agent; it stays gone.
        deleted = http.delete(f"/v1/devices/{registered[0]['id']}")
        assert deleted.status_code == 204
        wait_until(lambda: sum(a.poll() is not None for a in agents) == 1, 30, "agent stop")
        assert [a.returncode for a in agents if a.poll() is not None] == [0]
        listed = [d["id"] for d in http.get("/v1/devices").json()["devices"]]
        assert registered[0]["id"] not in listed
        assert http.delete(f"/v1/devices/{registered[0]['id']}").status_code == 404

        # An agent that dies shows offline once its heartbeats stop.
        survivor = next(a for a in agents if a.poll() is None)
        survivor.send_signal(signal.SIGKILL)
        survivor.wait()
        wait_until(lambda: not online(), 30, "the killed agent to show offline")
        listed = {d["id"]: d for d in http.get("/v1/devices").json()["devices"]}
        assert listed[registered[1]["id"]]["online"] is False
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()


def test_a_device_with_a_bad_class_is_refused(http: httpx.Client):
    answer = http.post("/v1/devices", json={"device_class": "has space", "host": "h"})

    assert answer.status_code == 422
    assert "invalid device class" in one_line_detail(answer)


def test_health_readiness_and_metrics(http: httpx.Client):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] is True and ready.json()["workers"] == []

    metrics = http.get("/metrics")

    assert metrics.headers["content-type"].startswith("text/plain")
    assert "archtree_redis_up 1.0" in metrics.text
    assert 'archtree_jobs{status="queued"}' in metrics.text
    assert 'archtree_measurement_queue_depth{device_class="api-cpu"} 0.0' in metrics.text


def test_the_api_is_unready_while_redis_is_unreachable(tmp_path: Path, redis_url: str):
    env = api_env(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    api = start_api(env, tmp_path / "logs")
    try:
        with api.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["redis"] is False and "not reachable" in ready.json()["detail"]
            assert client.get("/healthz").status_code == 200
            assert "archtree_redis_up 0.0" in client.get("/metrics").text
    finally:
        api.stop()


def test_openapi_documents_every_route_and_the_job_spec(http: httpx.Client):
    schema = http.get("/openapi.json").json()

    assert set(schema["paths"]) == {
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/tree",
        "/v1/jobs/{job_id}/events",
        "/v1/jobs/{job_id}/cancel",
        "/v1/jobs/{job_id}/artifacts/{name}",
        "/v1/devices",
        "/v1/devices/{device_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    spec = schema["components"]["schemas"]["JobSpecIn"]
    assert all("description" in field for field in spec["properties"].values())
    assert spec["examples"]
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert set(body["schema"]["properties"]) == {"spec", "weights", "data"}
    assert http.get("/docs").status_code == 200
