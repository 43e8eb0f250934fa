"""The HTTP API as a real uvicorn process on a private Redis: submission checks, upload limits,
job resources, devices with real agent processes, health and metrics. No workers run here."""

from __future__ import annotations

import ast
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import torch

from api.spec_terms import in_spec_terms
from search.artifacts import ARTIFACT_NAMES
from search.errors import ArchtreeError
from search.inputs import load_inputs
from search.model_source import import_optional, save_weights
from search.notes import pruned_near_chance
from search.settings import SearchSettings
from tests.api_fixtures import (
    MAX_DATA_BYTES,
    MAX_WEIGHTS_BYTES,
    ApiProcess,
    api_env,
    free_port,
    start_api,
)
from tests.cli_process import one_line_error, run_archtree
from tests.redis_fixtures import ROOT, redis_server_executable, wait_until
from workers.job_store import JobStore, RedisEventSink
from workers.tasks import result_name

pytest_plugins = ["tests.redis_fixtures", "tests.api_fixtures"]

SPEC = {
    "model": "builtin:vgg",
    "data": "builtin:digits",
    "budget": "60%",
    "device_class": "api-cpu",
    "search": {"width": 2, "branching": 2, "ft_steps": 5, "planned_steps": 2, "max_probes": 3},
}
AGENT_START_S = 60.0
# Every route under a job id: (method, path after /v1/jobs/{id}).
JOB_ROUTES = [
    ("GET", ""),
    ("GET", "/tree"),
    ("GET", "/events"),
    ("POST", "/cancel"),
    ("GET", "/artifacts/report.json"),
]
DEVICE_EXAMPLE = '{"device_class": "rpi4-cpu", "host": "rpi-07"}'


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
    stray = io.BytesIO()
    np.savez(stray, x=x, y=np.where(np.arange(len(y)) == 5, 100, y))
    wrong_keys = io.BytesIO()
    np.savez(wrong_keys, images=x)
    unlabelled = io.BytesIO()
    np.savez(unlabelled, x=x)
    return {
        "weights": (folder / "vgg.safetensors").read_bytes(),
        # Bytes no reader takes, the same every run: random ones that began as a pickle
        # does were read as one, and said to hold Python objects.
        "corrupt": b"\x00not a numpy archive, a torch file or weights\xff" * 80,
        "pickled": pickled.getvalue(),
        "data": data.getvalue(),
        "tiny": tiny.getvalue(),
        "stray label": stray.getvalue(),
        "wrong keys": wrong_keys.getvalue(),
        "unlabelled": unlabelled.getvalue(),
    }


@pytest.fixture(scope="module")
def job_store(redis_url: str) -> JobStore:
    """The API's job store, to put jobs (and their internal keys) in Redis directly."""
    return JobStore(redis.Redis.from_url(redis_url))


def submit(http: httpx.Client, spec: dict[str, Any] | str, **files: tuple[str, bytes]):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return http.post("/v1/jobs", data={"spec": text}, files=files or None)


def post_multipart(
    http: httpx.Client,
    parts: list[tuple[str | None, str | None, bytes]],
    closed: bool = True,
    media_type: str = "multipart/form-data",
) -> httpx.Response:
    """POST /v1/jobs with a multipart body built by hand from (name, file name, content) parts
    (None leaves the name or file name out); `closed` False leaves out the closing boundary."""
    boundary = "archtree-test-boundary"
    body = b""
    for name, filename, content in parts:
        disposition = "form-data" + (f'; name="{name}"' if name is not None else "")
        disposition += f'; filename="{filename}"' if filename is not None else ""
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += content + b"\r\n"
    body += f"--{boundary}--\r\n".encode() if closed else b""
    return http.post(
        "/v1/jobs",
        content=body,
        headers={"Content-Type": f"{media_type}; boundary={boundary}"},
    )


def job_total(http: httpx.Client) -> int:
    return http.get("/v1/jobs").json()["total"]


def stored_files(api: ApiProcess) -> list[Path]:
    return sorted(path for path in api.artifacts.rglob("*") if path.is_file())


def one_line_detail(answer: httpx.Response) -> str:
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


def wait_for_log(api: ApiProcess, text: str) -> str:
    """The API log's line that holds `text`, once it is written."""

    def line() -> str | None:
        return next((x for x in api.output().splitlines() if text in x), None)

    return wait_until(line, 10, f"{text!r} in the API's log")


BAD_SUBMISSIONS = {
    "bad budget": ({"budget": "fast"}, {}, "cannot read the budget 'fast'"),
    "unknown builtin": ({"model": "builtin:nope"}, {}, "unknown builtin model 'nope'"),
    "corrupt weights": ({}, {"weights": ("w.safetensors", "corrupt")}, "corrupt or truncated"),
    "pickled module": (
        {},
        {"weights": ("model.pt", "pickled")},
        "or pass `allow_pickle: true` in the spec (the operator must also enable "
        "ARCHTREE_ALLOW_PICKLE)",
    ),
    "data the model rejects": (
        {"data": None},
        {"data": ("tiny.npz", "tiny")},
        "rejects inputs of shape (1, 1, 1)",
    ),
    "bad device class": ({"device_class": "no spaces"}, {}, "invalid device class"),
    "no data": (
        {"data": None},
        {},
        "give the data as spec.data (builtin:mnist or builtin:digits) or upload a .npz/.pt file",
    ),
    "a data name without its prefix": (
        {"data": "MNIST"},
        {},
        "spec.data 'MNIST' is not a data source: did you mean 'builtin:mnist'? give the data as",
    ),
    "a data path": (
        {"data": "/srv/digits.npz"},
        {},
        "spec.data '/srv/digits.npz' is a file path, and the service reads no path of yours: "
        "upload the file as `data` (curl -F data=@digits.npz)",
    ),
    "a data name of no dataset": (
        {"data": "cifar"},
        {},
        "spec.data 'cifar' is not a data source: give the data as spec.data (builtin:mnist",
    ),
    "bad search setting": ({"search": {"width": 0}}, {}, "search.width must be at least 1"),
    "a search setting past its bound": (
        {"search": {"final_epochs": 1e300}},
        {},
        "search.final_epochs must be at most 10,000",
    ),
    "a search setting that is not a number": (
        {"search": {"final_epochs": float("nan")}},
        {},
        "final_epochs: Input should be a finite number",
    ),
    "a channel multiple past its bound": (
        {"search": {"widen_to": 1_000_000}},
        {},
        "search.widen_to must be at most 4,096",
    ),
    "batch-norm samples past their bound": (
        {"search": {"bn_samples": 10**22}},
        {},
        "search.bn_samples must be at most 1,000,000",
    ),
    "renamed search setting": (
        {"search": {"min_width_fraction": 1.5}},
        {},
        "search.min_width_fraction must be in [0, 1)",
    ),
    "two search settings": (
        {"search": {"max_depth": 1, "planned_steps": 2}},
        {},
        "search.max_depth must be at least search.planned_steps (1 is below 2; give both",
    ),
    "unknown move": (
        {"search": {"move_kinds": ["global", "sideways"]}},
        {},
        "search.move_kinds: unknown move 'sideways'",
    ),
    "unknown search setting": ({"search": {"widht": 2}}, {}, "search.widht"),
    "pickle not allowed": ({"allow_pickle": True}, {}, "does not load pickled weights"),
    "module source": ({"model": "module:os:getcwd"}, {}, "does not build 'module:os:getcwd'"),
    "a weights file as the model": (
        {"model": "resnet.pt"},
        {},
        "give the code that builds the model as `model` (builtin:NAME, module:package.module:"
        "callable, torchvision:NAME, timm:NAME) and the weights file as the `weights` upload",
    ),
    "a misspelt library": (
        {"model": "torchvison:resnet18"},
        {},
        "did you mean 'torchvision:resnet18'?",
    ),
    "data twice": ({}, {"data": ("d.npz", "data")}, "not both"),
    "a stray label": (
        {"data": None},
        {"data": ("d.npz", "stray label")},
        "Fix the stray labels, or give num_classes 101",
    ),
    "data that is neither a numpy archive nor a torch file": (
        {"data": None},
        {"data": ("notes.txt", "corrupt")},
        "the data upload (notes.txt) is neither a numpy archive (.npz) nor a torch file (.pt), "
        "whatever its name",
    ),
    "a torch file cut short": (
        {"data": None},
        {"data": ("d.pt", "corrupt")},
        "cannot read the data upload (d.pt) as a torch file",
    ),
    "data without x": (
        {"data": None},
        {"data": ("d.npz", "wrong keys")},
        "the data upload (d.npz) has no array named `x` (found: images)",
    ),
    "a budget without its unit": (
        {"budget": 60},
        {},
        'budget: give the budget as text with its unit: "60ms" or "60%"',
    ),
    "weights of another model": (
        {"model": "builtin:resnet"},
        {"weights": ("vgg.safetensors", "weights")},
        "number of classes and input channels (the data's)",
    ),
    "an unknown builtin dataset": (
        {"data": "builtin:nope"},
        {},
        "or your own copy of it sent as the `data` upload, a file saved e.g. by numpy.savez(",
    ),
    "search settings that are not an object": (
        {"search": "fast"},
        {},
        "the job spec is not valid: search: Input should be an object",
    ),
    "a number sent as text": (
        {"search": {"width": "2"}},
        {},
        "search.width: Input should be a valid integer",
    ),
    "a number sent as a boolean": (
        {"search": {"width": True}},
        {},
        "search.width: Input should be a valid integer",
    ),
    "a boolean sent as text": (
        {"allow_pickle": "yes"},
        {},
        "allow_pickle: Input should be a valid boolean",
    ),
    # The search's own checks before any timing: refused at submission, not queued to fail.
    "taylor importance without labels": (
        {"data": None, "search": {**SPEC["search"], "importance": "taylor"}},
        {"data": ("d.npz", "unlabelled")},
        "taylor importance needs labelled data: use search.importance l2",
    ),
    "a round_to that keeps every group whole": (
        {"search": {**SPEC["search"], "round_to": 4096}},
        {},
        "nothing in builtin:vgg can be pruned: search.round_to 4096 keeps every channel group "
        "whole; give a smaller search.round_to",
    ),
    "weights in the spec": (
        {"weights": "model.safetensors"},
        {},
        # It is an object: what is wrong is the field, not its shape.
        "the job spec is not valid: `weights` is not a spec field: send the weights file as the "
        "`weights` upload",
    ),
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
    assert "--" not in detail  # spec fields, not the CLI's options
    assert job_total(http) == before_jobs
    assert stored_files(api_server) == before_files


def test_a_model_library_the_service_lacks_is_said_to_be_its_operators_to_install():
    with pytest.raises(ArchtreeError) as raised:
        import_optional("archtree_absent_library", "archtree_absent_library:net")
    said = in_spec_terms(str(raised.value))
    assert "the service's operator can install archtree_absent_library into its environment" in (
        said
    )
    assert "this environment" not in said


def test_a_spec_that_gives_a_field_twice_answers_422_naming_it(http: httpx.Client):
    before = job_total(http)
    search = json.dumps(SPEC["search"])[:-1] + ', "ft_steps": -1, "ft_steps": 0}'
    text = json.dumps({k: v for k, v in SPEC.items() if k != "search"})[:-1]
    answer = submit(http, f'{text}, "search": {search}}}')
    assert answer.status_code == 422, answer.text
    assert one_line_detail(answer) == (
        'the job spec gives "ft_steps" 3 times in one object: give each field once'
    )
    answer = submit(http, '{"budget": "60%", ' + json.dumps(SPEC)[1:])
    assert one_line_detail(answer) == (
        'the job spec gives "budget" 2 times in one object: give each field once'
    )
    assert job_total(http) == before


@pytest.mark.parametrize(("spec", "why"), [("{not json", "key must be a string"), ("[1, 2]", "")])
def test_a_spec_that_is_not_a_json_object_answers_422_with_an_example(
    spec: str, why: str, http: httpx.Client
):
    answer = submit(http, spec)

    assert answer.status_code == 422
    detail = one_line_detail(answer)
    assert detail.startswith("the job spec is not a JSON object (") and why in detail
    assert 'give one like {"model": "builtin:vgg"' in detail


def test_a_spec_sent_as_a_file_is_read_as_the_spec(http: httpx.Client):
    answer = http.post("/v1/jobs", files={"spec": ("spec.json", json.dumps(SPEC).encode())})

    assert answer.status_code == 202, answer.text
    job = http.get(f"/v1/jobs/{answer.json()['id']}").json()
    assert job["spec"]["search"] == SPEC["search"]


SPEC_TEXT = json.dumps(SPEC).encode()


def test_a_spec_with_a_byte_order_mark_or_an_upper_case_media_type_is_read(http: httpx.Client):
    bom = post_multipart(http, [("spec", None, "\ufeff".encode() + SPEC_TEXT)])
    assert bom.status_code == 202, bom.text
    upper = post_multipart(http, [("spec", None, SPEC_TEXT)], media_type="Multipart/Form-Data")
    assert upper.status_code == 202, upper.text


BAD_FORMS = {
    "spec twice": ([("spec", None, SPEC_TEXT), ("spec", None, SPEC_TEXT)], "given twice"),
    "weights as a text field": (
        [("spec", None, SPEC_TEXT), ("weights", None, b"hello")],
        "`weights` must be a file, not a text field",
    ),
    "an unknown upload": (
        [("spec", None, SPEC_TEXT), ("model", "m.pt", b"x")],
        "unexpected form field 'model'",
    ),
    "a part without a name": (
        [(None, None, SPEC_TEXT)],
        '"name" must be provided: send the job as multipart/form-data',
    ),
    "no spec": ([("weights", "w.pt", b"x")], "the form has no `spec` field"),
    "an empty spec": ([("spec", None, b" ")], "the `spec` field is empty: give the job's JSON"),
}


@pytest.mark.parametrize("case", BAD_FORMS, ids=list(BAD_FORMS))
def test_a_malformed_form_answers_422_saying_what_to_send(case: str, http: httpx.Client):
    parts, expected = BAD_FORMS[case]

    answer = post_multipart(http, parts)

    assert answer.status_code == 422, answer.text
    detail = one_line_detail(answer)
    assert expected in detail
    assert "Maximum number" not in detail


def test_framework_form_errors_say_what_to_send(http: httpx.Client):
    hint = "`spec` as one form field holding the job's JSON, and optional `weights` and `data`"
    no_boundary = http.post(
        "/v1/jobs", content=b"x", headers={"Content-Type": "multipart/form-data"}
    )
    url_encoded = http.post(
        "/v1/jobs",
        content=b"spec=1&x=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    cut_off = post_multipart(http, [("spec", None, SPEC_TEXT)], closed=False)

    assert no_boundary.status_code == 422 and hint in one_line_detail(no_boundary)
    assert url_encoded.status_code == 422
    assert "unexpected form field 'x'" in one_line_detail(url_encoded)
    assert cut_off.status_code == 422
    assert "the upload was cut off" in one_line_detail(cut_off)


def test_a_spec_field_in_another_encoding_than_utf8_is_refused_not_misread(http: httpx.Client):
    """Starlette reads a field that is not UTF-8 as Latin-1: a job would have been created
    whatever encoding was meant, where the JSON body and a spec file are refused."""
    latin1 = json.dumps({**SPEC, "device_class": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    before_jobs = job_total(http)

    multipart = post_multipart(http, [("spec", None, latin1)])
    url_encoded = http.post(
        "/v1/jobs",
        content=b"spec=" + urllib.parse.quote_from_bytes(latin1).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )

    assert multipart.status_code == 422, multipart.text
    assert one_line_detail(multipart) == (
        "the `spec` field is not UTF-8 text: send the job's JSON in UTF-8"
    )
    assert url_encoded.status_code == 422, url_encoded.text
    assert one_line_detail(url_encoded).startswith("the `spec` field is not UTF-8 text")
    assert job_total(http) == before_jobs
    # The same spec in UTF-8 is read as sent, both ways (and its device class refused as such).
    utf8 = latin1.decode("latin-1").encode()
    for answer in (
        post_multipart(http, [("spec", None, utf8)]),
        http.post(
            "/v1/jobs",
            content=b"spec=" + urllib.parse.quote_from_bytes(utf8).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
    ):
        assert answer.status_code == 422, answer.text
        assert one_line_detail(answer).startswith("invalid device class 'caf\u00e9': use")


def test_a_spec_over_its_limit_answers_413_naming_the_spec(http: httpx.Client):
    big = json.dumps({**SPEC, "padding": "x" * 70_000})

    for answer in [post_multipart(http, [("spec", None, big.encode())]), submit(http, big)]:
        assert answer.status_code == 413, answer.text
        assert "the spec is too large: at most 65536 bytes" in one_line_detail(answer)


def test_a_declared_size_over_the_limit_blames_the_request_not_an_upload(api_server: ApiProcess):
    host, port = api_server.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/jobs HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 99999999999999\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head.encode())
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk

    status, _, body = answer.decode().partition("\r\n\r\n")
    assert status.startswith("HTTP/1.1 413")
    detail = json.loads(body)["detail"]
    assert "the request declares 99999999999999 bytes" in detail
    assert "the data upload" not in detail


def test_an_oversized_weights_upload_answers_413_naming_the_limit(
    http: httpx.Client, api_server: ApiProcess
):
    before_jobs, before_files = job_total(http), stored_files(api_server)

    answer = submit(http, SPEC, weights=("big.safetensors", os.urandom(MAX_WEIGHTS_BYTES + 1)))

    assert answer.status_code == 413
    assert f"limit of {MAX_WEIGHTS_BYTES} bytes" in one_line_detail(answer)
    assert job_total(http) == before_jobs
    assert stored_files(api_server) == before_files


@pytest.mark.parametrize(
    ("content_type", "start"),
    [
        (
            "multipart/form-data; boundary=cut",
            b'--cut\r\nContent-Disposition: form-data; name="weights"; filename="w.pt"\r\n\r\n'
            + b"x" * 5000,
        ),
        ("application/x-www-form-urlencoded", b"spec=%7B"),
    ],
    ids=["multipart", "url-encoded"],
)
def test_a_client_that_hangs_up_mid_upload_leaves_no_traceback_and_no_job(
    content_type: str, start: bytes, http: httpx.Client, api_server: ApiProcess
):
    before_jobs, before_files = job_total(http), stored_files(api_server)
    logged = len(api_server.output())
    with socket.create_connection(("127.0.0.1", int(api_server.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: test\r\n"
            + f"Content-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n".encode()
            + start
        )
        sock.shutdown(socket.SHUT_WR)  # the rest never comes
        # The API ends the exchange; the client reads until the connection closes.
        while sock.recv(65536):
            pass

    said = wait_until(
        lambda: "hung up" in api_server.output()[logged:] and api_server.output()[logged:],
        10,
        "the hang-up logged",
    )
    assert "POST /v1/jobs: the client hung up before its request ended; nothing was kept" in said
    assert "Traceback" not in said and "ClientDisconnect" not in said, said
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
    assert job["spec"]["upload_names"] == {"weights": "vgg.safetensors", "data": "digits.npz"}
    inputs = api_server.artifacts / "jobs" / job_id / "inputs"
    assert (inputs / "weights.safetensors").read_bytes() == uploads["weights"]
    assert (inputs / "data.npz").read_bytes() == uploads["data"]

    tree = http.get(f"/v1/jobs/{job_id}/tree").json()
    assert tree["nodes"] == [] and tree["frontier"] == [] and tree["budget_ms"] is None
    missing = http.get(f"/v1/jobs/{job_id}/artifacts/report.json")
    assert missing.status_code == 404
    assert "no report.json yet: it is queued" in one_line_detail(missing)
    assert http.get(f"/v1/jobs/{job_id}/artifacts/secrets.txt").status_code == 404

    # No worker runs here: a queued job is cancelled at once, not when a worker takes it.
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
    assert cancelled.json()["status"] == "cancelled"
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        kinds = [
            line.removeprefix("event: ")
            for line in stream.iter_lines()
            if line.startswith("event: ")
        ]
    assert kinds == ["queued", "cancel_requested", "status"]
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    ended = one_line_detail(http.get(f"/v1/jobs/{job_id}/artifacts/report.json"))
    assert ended.endswith("has no report.json: it ended cancelled, without results")


def test_an_ended_job_is_deleted_with_all_the_service_keeps_of_it(
    api_server: ApiProcess, job_store: JobStore, uploads: dict[str, bytes]
):
    jobs = job_store
    spec = {key: value for key, value in SPEC.items() if key != "data"}

    def send_with_key(http: httpx.Client) -> httpx.Response:
        return http.post(
            "/v1/jobs",
            data={"spec": json.dumps(spec)},
            files={"data": ("mine.npz", uploads["data"])},
            headers={"Idempotency-Key": "delete-me"},
        )

    with api_server.client() as http:
        sent = send_with_key(http)
        assert sent.status_code == 202, sent.text
        job_id = sent.json()["id"]
        kept = submit(http, SPEC).json()["id"]
        folder = api_server.artifacts / "jobs" / job_id
        assert [p.name for p in (folder / "inputs").iterdir()] == ["data.npz"]
        jobs.save_state(job_id, {"depth": 0})  # as a worker that started it leaves
        jobs.mark_step(job_id, "start")

        # Not ended: refused, and nothing is removed.
        refused = http.delete(f"/v1/jobs/{job_id}")
        assert refused.status_code == 409
        assert one_line_detail(refused) == (
            f"job {job_id} has not ended (queued): cancel it first (POST "
            f"/v1/jobs/{job_id}/cancel), then delete it once it has ended"
        )
        assert folder.exists() and jobs.get(job_id)["status"] == "queued"

        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        deleted = http.delete(f"/v1/jobs/{job_id}")

        assert deleted.status_code == 204 and deleted.content == b""
        assert not folder.exists()
        assert jobs.client.keys(f"{jobs.key(job_id)}*") == []  # record, events, state, steps
        assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        listed = [job["id"] for job in http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]]
        assert job_id not in listed and kept in listed
        assert jobs.get(kept)["status"] == "queued"  # another job is untouched
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 404
        # Its Idempotency-Key names no job now: sent again, the submission is a new job.
        again = send_with_key(http)
        assert again.status_code == 202, again.text
        assert again.json()["id"] != job_id


def test_a_running_job_asked_to_cancel_is_deleted_once_it_has_stopped(
    api_server: ApiProcess, job_store: JobStore
):
    with api_server.client() as http:
        job_id = submit(http, SPEC).json()["id"]
        job_store.set_status_if_active(job_id, "running")
        assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202

        refused = http.delete(f"/v1/jobs/{job_id}")

        assert refused.status_code == 409
        assert one_line_detail(refused) == (
            f"job {job_id} has not ended (running, cancel requested): it stops within "
            "seconds; delete it once its status is cancelled"
        )
        assert job_store.get(job_id)["status"] == "running"
        job_store.set_status_if_active(job_id, "cancelled")  # as its worker does on stopping
        assert http.delete(f"/v1/jobs/{job_id}").status_code == 204


def test_cancels_asked_at_once_are_recorded_once(api_server: ApiProcess, job_store: JobStore):
    jobs = job_store

    def cancel_at_once(job_id: str, clients: int = 8) -> list[int]:
        ready = threading.Barrier(clients)

        def cancel(_: int) -> int:
            with api_server.client() as http:
                ready.wait()
                return http.post(f"/v1/jobs/{job_id}/cancel").status_code

        with ThreadPoolExecutor(clients) as pool:
            return sorted(pool.map(cancel, range(clients)))

    def cancels_recorded(job_id: str) -> int:
        return [e["kind"] for _, e in jobs.read_events(job_id)].count("cancel_requested")

    with api_server.client() as http:
        queued = submit(http, SPEC).json()["id"]
        running = submit(http, SPEC).json()["id"]
    # A queued job ends at the first cancel: the others find it ended, as a second one does.
    assert cancel_at_once(queued) == [202] + [409] * 7
    assert cancels_recorded(queued) == 1
    # A running one (as a worker that took it shows it) goes on until it sees the cancel: every
    # cancel is accepted, and one is recorded.
    assert jobs.set_status_if_active(running, "running")
    assert cancel_at_once(running) == [202] * 8
    assert cancels_recorded(running) == 1
    job = jobs.get(running)
    assert job["status"] == "running" and job["cancel_requested"]


@pytest.mark.parametrize(
    ("status", "instead", "in_cli_terms"),
    [
        (
            "succeeded",
            "fetch its results with GET /v1/jobs/{id}/artifacts/{{name}} (arch.json, "
            "model.safetensors, report.json), or delete it with DELETE /v1/jobs/{id}",
            "`archtree fetch {id} --api {api} --out DIR` downloads its result, `archtree "
            "delete {id} --api {api}` deletes it",
        ),
        (
            "cancelled",
            "delete it with DELETE /v1/jobs/{id}, or submit its spec again with POST /v1/jobs",
            # The command that runs it again, with its own options.
            "`archtree delete {id} --api {api}` deletes it; this submits it again: archtree "
            "submit --api {api} --model builtin:vgg --data builtin:digits --budget 60% "
            "--device-class api-cpu --width 2 --branching 2 --ft-steps 5 --planned-steps 2 "
            "--max-probes 3",
        ),
    ],
)
def test_cancelling_an_ended_job_says_what_can_be_done_with_it_instead(
    status: str,
    instead: str,
    in_cli_terms: str,
    api_server: ApiProcess,
    job_store: JobStore,
    tmp_path: Path,
):
    job_id = job_store.create(SPEC)
    assert job_store.set_status_if_active(job_id, status)
    ended = f"job {job_id} has already ended ({status}): there is nothing to cancel; "

    with api_server.client() as http:
        refused = http.post(f"/v1/jobs/{job_id}/cancel")
    cancelled = run_archtree("cancel", job_id, "--api", api_server.url, home=tmp_path)

    assert refused.status_code == 409
    assert one_line_detail(refused) == ended + instead.format(id=job_id)
    # The commands it names go to the API the command was given.
    instead_in_cli = in_cli_terms.format(id=job_id, api=api_server.url)
    assert one_line_error(cancelled) == f"archtree: error: {ended}{instead_in_cli}"
    assert job_store.get(job_id)["status"] == status


@pytest.mark.parametrize("name", ["d.bin", "data", "digits.NPZ.txt"])
@pytest.mark.parametrize("kind", ["numpy archive", "torch file"])
def test_a_data_upload_is_read_by_its_content_whatever_its_name(
    name: str, kind: str, http: httpx.Client, uploads: dict[str, bytes]
):
    content = uploads["data"]
    if kind == "torch file":
        with np.load(io.BytesIO(content)) as arrays:
            saved = io.BytesIO()
            torch.save(
                {"x": torch.as_tensor(arrays["x"]), "y": torch.as_tensor(arrays["y"])}, saved
            )
        content = saved.getvalue()
    spec = {key: value for key, value in SPEC.items() if key != "data"}

    answer = submit(http, spec, data=(name, content))

    assert answer.status_code == 202, answer.text
    assert http.post(f"/v1/jobs/{answer.json()['id']}/cancel").status_code == 202


def test_a_submission_sent_again_with_its_idempotency_key_gets_the_same_job(
    http: httpx.Client, job_store: JobStore
):
    def sent(spec: dict[str, Any], key: str) -> httpx.Response:
        return http.post(
            "/v1/jobs", data={"spec": json.dumps(spec)}, headers={"Idempotency-Key": key}
        )

    before = http.get("/v1/jobs").json()["total"]
    first = sent(SPEC, "key-1")
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert first.json()["replayed"] is False
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    again = sent(SPEC, "key-1")
    assert again.status_code == 202, again.text
    assert again.json()["id"] == job_id and again.json()["status"] == "cancelled"
    assert again.json()["replayed"] is True  # the job an earlier submission created
    created = http.get("/openapi.json").json()["components"]["schemas"]["JobCreated"]
    assert "Idempotency-Key" in created["properties"]["replayed"]["description"]
    reordered = sent(dict(reversed(SPEC.items())), "key-1")  # the same spec, keys in another order
    assert reordered.status_code == 202 and reordered.json()["id"] == job_id, reordered.text
    # The same spec as the service reads it: the spaces it drops around the budget.
    spaced = sent(SPEC | {"budget": f" {SPEC['budget']} "}, "key-1")
    assert spaced.status_code == 202 and spaced.json()["id"] == job_id, spaced.text
    other = sent(SPEC, "key-2")
    assert other.status_code == 202 and other.json()["id"] != job_id
    assert other.json()["replayed"] is False
    # A key names one submission: another sent with it is refused, not given the first's job.
    reused = sent(SPEC | {"budget": "70%"}, "key-1")
    assert reused.status_code == 422, reused.text
    assert reused.json()["detail"] == (
        f"the Idempotency-Key 'key-1' came with another submission within the last day (job "
        f"{job_id}): a key names one submission; send this one with a key of its own"
    )
    assert http.post(f"/v1/jobs/{other.json()['id']}/cancel").status_code == 202
    assert http.get("/v1/jobs").json()["total"] == before + 2

    # A submission refused by its checks creates nothing and leaves its key free.
    refused = sent(SPEC | {"budget": "soon"}, "key-3")
    assert refused.status_code == 422, refused.text
    mended = sent(SPEC, "key-3")
    assert mended.status_code == 202, mended.text
    assert http.post(f"/v1/jobs/{mended.json()['id']}/cancel").status_code == 202

    # The first submission with a key still being checked: the second is told to wait.
    job_store.claim_submission("key-4", "not-yet-created")
    waiting = sent(SPEC, "key-4")
    assert waiting.status_code == 409 and waiting.headers["retry-after"] == "2"
    assert "is still being checked: send it again in a few seconds" in waiting.json()["detail"]
    too_long = sent(SPEC, "k" * 201)
    assert too_long.status_code == 422
    assert too_long.json()["detail"].startswith(
        "the Idempotency-Key header must be 1 to 200 printable ASCII characters"
    )
    # A key that is not ASCII is echoed as the client wrote it (HTTP carries bytes).
    accented = http.post(
        "/v1/jobs", data={"spec": json.dumps(SPEC)}, headers={"Idempotency-Key": "clé".encode()}
    )
    assert accented.status_code == 422
    assert accented.json()["detail"].endswith("such as a random UUID, not 'clé'")
    assert http.get("/v1/jobs").json()["total"] == before + 3


def test_an_idempotency_key_tells_uploads_apart_by_their_contents(
    http: httpx.Client, uploads: dict[str, bytes], tmp_path: Path
):
    """Retrained weights of the same architecture are a file of the same name and size."""
    model = load_inputs("builtin:vgg", "builtin:digits").model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    save_weights(model, tmp_path / "vgg.safetensors")
    retrained = (tmp_path / "vgg.safetensors").read_bytes()
    assert len(retrained) == len(uploads["weights"]) and retrained != uploads["weights"]

    def sent(weights: bytes) -> httpx.Response:
        return http.post(
            "/v1/jobs",
            data={"spec": json.dumps(SPEC)},
            files={"weights": ("vgg.safetensors", weights)},
            headers={"Idempotency-Key": "retrained"},
        )

    first = sent(uploads["weights"])
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    again = sent(uploads["weights"])
    assert again.status_code == 202 and again.json()["id"] == job_id, again.text
    other = sent(retrained)
    assert other.status_code == 422, other.text
    detail = other.json()["detail"]
    assert f"came with another submission within the last day (job {job_id})" in detail


def test_a_submission_whose_answer_is_lost_is_sent_again_and_creates_one_job(
    api_server: ApiProcess, http: httpx.Client
):
    from archtree_cli.client import ArchtreeClient
    from tests.http_servers import serving

    created: list[str] = []

    class LosesTheFirstAnswer(BaseHTTPRequestHandler):
        """A proxy to the API that drops its first answer: the job exists, the client never
        hears of it."""

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            skipped = ("host", "content-length", "connection")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in skipped}
            answer = httpx.post(api_server.url + self.path, content=body, headers=headers)
            if not created:
                created.append(answer.json()["id"])
                self.close_connection = True
                return
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers["content-type"])
            self.send_header("Content-Length", str(len(answer.content)))
            self.end_headers()
            self.wfile.write(answer.content)

        def log_message(self, *_: object) -> None:
            pass

    before = http.get("/v1/jobs").json()["total"]
    retries: list[str] = []
    with serving(LosesTheFirstAnswer) as proxy, ArchtreeClient(proxy) as client:
        job = client.submit(SPEC, on_retry=retries.append)
    assert job["id"] == created[0]
    assert len(retries) == 1 and "sending the job again (1 of 3)" in retries[0]
    # Found by its key, the job its own first send created: `submit` does not call it earlier.
    assert job["replayed"] is True and job["sends"] == 2
    assert http.get("/v1/jobs").json()["total"] == before + 1
    assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202


def test_archtree_submit_sent_again_with_its_idempotency_key_gets_the_same_job(
    api_server: ApiProcess, http: httpx.Client, tmp_path: Path
):
    command = ["submit", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%",
               "--device-class", "api-cpu", "--api", api_server.url]  # fmt: skip
    before = http.get("/v1/jobs").json()["total"]

    first = run_archtree(*command, "--idempotency-key", "nightly-42", home=tmp_path)
    again = run_archtree(*command, "--idempotency-key", "nightly-42", home=tmp_path)
    other = run_archtree(*command, home=tmp_path)

    assert first.returncode == again.returncode == other.returncode == 0, first.stderr
    job_id = first.stdout.strip()
    assert again.stdout.strip() == job_id and other.stdout.strip() != job_id
    assert http.get("/v1/jobs").json()["total"] == before + 2
    follow = f"follow it with: archtree status {job_id} --api {api_server.url} --watch"
    assert first.stderr.splitlines()[0] == follow
    # Sent again, the job is said to be the one the key named, as it is now.
    assert again.stderr.splitlines()[0] == (
        f"job {job_id} was submitted earlier with this --idempotency-key; it is queued: {follow}"
    )
    changed = [*command[:-2], "--budget", "70%", "--api", api_server.url]
    reused = run_archtree(*changed, "--idempotency-key", "nightly-42", home=tmp_path)
    assert reused.returncode == 2, reused.stderr
    assert reused.stderr.strip() == (
        "archtree: error: the --idempotency-key 'nightly-42' came with another submission "
        f"within the last day (job {job_id}): a key names one submission; give this one another "
        "--idempotency-key (or none)"
    )
    for created in (job_id, other.stdout.strip()):
        assert http.post(f"/v1/jobs/{created}/cancel").status_code == 202
    for key in ("", "k" * 201, "caf\u00e9"):
        refused = run_archtree(*command, "--idempotency-key", key, home=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert refused.stderr.startswith(
            "archtree: error: --idempotency-key must be 1 to 200 printable ASCII characters, "
            f"not {key[:40]!r}"
        ), refused.stderr
    assert http.get("/v1/jobs").json()["total"] == before + 2
    ended = run_archtree(*command, "--idempotency-key", "nightly-42", home=tmp_path)
    assert ended.returncode == 0 and ended.stdout.strip() == job_id, ended.stderr
    assert ended.stderr.strip() == (
        f"job {job_id} was submitted earlier with this --idempotency-key; it was cancelled: a "
        "submit with another --idempotency-key (or none) runs it again"
    )


def test_names_pasted_with_spaces_around_them_are_kept_without_them(http: httpx.Client):
    pasted = {"budget": " 60% \n", "model": " builtin:vgg ", "data": "\tbuiltin:digits"}
    search = SPEC["search"] | {
        "strategy": " greedy ",
        "importance": "l2 ",
        "move_kinds": [" global", "uniform "],
    }
    answer = submit(
        http, SPEC | pasted | {"device_class": " api-cpu ", "dtype": " float32", "search": search}
    )

    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    spec = http.get(f"/v1/jobs/{job_id}").json()["spec"]
    assert (spec["budget"], spec["model"], spec["data"], spec["device_class"]) == (
        "60%",
        "builtin:vgg",
        "builtin:digits",
        "api-cpu",
    )
    assert spec["dtype"] == "float32"
    assert (spec["search"]["strategy"], spec["search"]["importance"]) == ("greedy", "l2")
    assert spec["search"]["move_kinds"] == ["global", "uniform"]
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 202


def test_a_setting_the_strategy_overrides_is_named_even_at_its_default(http: httpx.Client):
    width = SearchSettings().width
    search = {"strategy": "greedy", "width": width, "branching": None, "seed": 0}
    answer = submit(http, SPEC | {"search": search})
    assert answer.status_code == 202, answer.text
    job = http.get(f"/v1/jobs/{answer.json()['id']}").json()
    assert job["progress"]["notes"] == [
        f"search.width {width} is not used: search.strategy greedy runs with 1"
    ]


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


def test_a_partial_job_record_answers_404_like_a_missing_job(
    http: httpx.Client, job_store: JobStore
):
    # What a late progress write leaves when Redis lost the job: no status, no spec.
    job_id = "0123456789ab"
    job_store.client.hset(job_store.key(job_id), mapping={"progress": "{}", "updated_at": 1})
    job_store.update_progress(job_id, depth=1)  # and no worker writes into it either
    assert job_store.client.hkeys(job_store.key(job_id)) == [b"progress", b"updated_at"]
    for path in ("", "/tree", "/events", "/artifacts/report.json"):
        answer = http.get(f"/v1/jobs/{job_id}{path}")
        assert answer.status_code == 404, path
        assert f"no job '{job_id}'" in one_line_detail(answer)
    job_store.client.delete(job_store.key(job_id))


def test_ids_that_name_a_jobs_internal_keys_answer_404_and_change_nothing(
    http: httpx.Client, job_store: JobStore
):
    job_id = job_store.create(SPEC)
    key = job_store.key(job_id)
    job_store.client.set(f"{key}:state", "{}")
    job_store.client.set(f"{key}:plan:1", "[]")
    job_store.client.hset(f"{key}:children", "n1", "{}")
    job_store.client.hset(f"{key}:steps", "depth-1", "1")
    keys = sorted(job_store.client.scan_iter(match=f"{key}*"))
    before = [job_store.client.dump(name) for name in keys]

    for suffix in [":events", ":state", ":plan:1", ":children", ":steps"]:
        for method, route in JOB_ROUTES:
            answer = http.request(method, f"/v1/jobs/{job_id}{suffix}{route}")
            assert answer.status_code == 404, (suffix, route, answer.text)
            assert f"no job '{job_id}{suffix}'" in one_line_detail(answer)
    assert [job_store.client.dump(name) for name in keys] == before


def test_a_failed_jobs_error_names_spec_fields(http: httpx.Client, job_store: JobStore):
    job_id = job_store.create(SPEC)
    job_store.set_status_if_active(
        job_id, "failed", "Give a budget of at least 0.137 ms, or lower --min-width or --margin."
    )
    for answer in (http.get(f"/v1/jobs/{job_id}"), http.get("/v1/jobs")):
        assert answer.status_code == 200
        text = answer.text
        assert "lower search.min_width_fraction or search.margin" in text and "--" not in text


def test_a_succeeded_jobs_report_names_settings_in_its_notes_as_spec_fields(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess
):
    job_id = job_store.create(SPEC)
    job_store.set_status_if_active(job_id, "succeeded")
    stored = api_server.artifacts / result_name(job_id, "report.json")
    stored.parent.mkdir(parents=True, exist_ok=True)
    note = pruned_near_chance(0.1, 0.9, torch.arange(10))  # as the engine words it
    assert note and "raise --ft-steps, --select-steps or --final-epochs" in note
    stored.write_text(json.dumps({"budget_ms": 2.5, "notes": [note], "tree": [{"id": "n1"}]}))

    answer = http.get(f"/v1/jobs/{job_id}/artifacts/report.json")

    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    report = answer.json()
    assert report["notes"] == [
        note.replace("--ft-steps, --select-steps or --final-epochs", "search.ft_steps, "
                     "search.select_steps or search.final_epochs")
    ]  # fmt: skip
    assert {**report, "notes": [note]} == json.loads(stored.read_text())  # the rest as stored


def test_a_failed_jobs_results_are_refused_saying_where_its_error_is(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess, tmp_path: Path
):
    job_id = job_store.create(SPEC)
    job_store.set_status_if_active(job_id, "failed")
    detail = one_line_detail(http.get(f"/v1/jobs/{job_id}/artifacts/report.json"))
    assert detail.endswith(
        f"it ended failed, without results; its error says why: GET /v1/jobs/{job_id}"
    )
    # The command line names its own command for that read.
    fetched = run_archtree(
        "fetch", job_id, "--api", api_server.url, "--out", str(tmp_path / "out"), home=tmp_path
    )
    assert fetched.returncode == 2, fetched.stderr
    assert fetched.stderr.strip().endswith(
        f"its error says why: `archtree status {job_id} --api {api_server.url}`"
    )


def test_archtree_status_of_a_queued_job_says_when_no_worker_answers(
    job_store: JobStore, api_server: ApiProcess, tmp_path: Path
):
    """No worker runs beside this API: a queued job would wait for ever, and says so."""
    job_id = job_store.create(SPEC)
    try:
        shown = run_archtree("status", job_id, "--api", api_server.url, home=tmp_path)
    finally:
        job_store.request_cancel(job_id)

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"job {job_id} queued: ")
    assert shown.stdout.endswith(
        "queued: no worker of the service answered: the job waits in the queue until one runs "
        "(`archtree worker` on a machine that reaches the service's Redis)\n"
    )


def test_archtree_delete_deletes_every_job_it_can_and_names_the_others(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess, tmp_path: Path
):
    first, running, stopping, last = (job_store.create(SPEC) for _ in range(4))
    job_store.set_status_if_active(first, "cancelled")
    job_store.set_status_if_active(last, "failed")
    job_store.set_status_if_active(stopping, "running")
    job_store.request_cancel(stopping)

    result = run_archtree(
        "delete", first, "nosuchjob", running, stopping, last, "--api", api_server.url,
        home=tmp_path,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    deleted = "deleted, with its uploads, result files and events"
    assert result.stdout == f"job {first} {deleted}\njob {last} {deleted}\n"
    assert result.stderr.splitlines() == [
        "archtree: error: no job 'nosuchjob': list the jobs with `archtree jobs --api "
        f"{api_server.url}`",
        f"archtree: error: job {running} has not ended (queued): stop it with `archtree cancel "
        f"{running} --api {api_server.url}`, then delete it once it has ended",
        f"archtree: error: job {stopping} has not ended (running, cancel requested): it stops "
        f"within seconds; delete it once it has (`archtree status {stopping} --api "
        f"{api_server.url}` says when)",
    ]
    assert [
        http.get(f"/v1/jobs/{job}").status_code for job in (first, running, stopping, last)
    ] == [404, 200, 200, 404]
    http.post(f"/v1/jobs/{running}/cancel")
    job_store.set_status_if_active(stopping, "cancelled")


def test_archtree_jobs_past_the_end_of_no_jobs_says_there_are_none(
    http: httpx.Client, api_server: ApiProcess, tmp_path: Path
):
    status = "waiting_for_device"  # no job here waits: no worker runs them
    assert http.get("/v1/jobs", params={"status": status}).json()["total"] == 0
    listed = run_archtree(
        "jobs", "--status", status, "--offset", "5", "--api", api_server.url, home=tmp_path
    )
    assert listed.returncode == 0 and listed.stdout == "", listed.stderr
    assert listed.stderr == f"no {status} jobs\n"


def test_a_succeeded_jobs_result_lost_by_the_store_answers_503_its_path_logged_only(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess
):
    job_id = job_store.create(SPEC)
    job_store.set_status_if_active(job_id, "succeeded")  # its result files are not there

    answer = http.get(f"/v1/jobs/{job_id}/artifacts/report.json")

    assert answer.status_code == 503 and answer.headers["retry-after"]
    assert one_line_detail(answer) == (
        f"job {job_id} succeeded, but its report.json is missing from the service's file "
        "store: the operator's to fix (the API's log says where); try again later"
    )
    # The store's path is the operator's: in the API's log, not in the answer.
    assert str(api_server.artifacts) not in answer.text
    logged = wait_for_log(api_server, f"jobs/{job_id}/result/report.json is missing")
    assert str(api_server.artifacts) in logged and "ARCHTREE_ARTIFACTS_URL" in logged


def test_a_submission_the_store_cannot_take_answers_503_and_creates_nothing(
    http: httpx.Client, api_server: ApiProcess
):
    """A spec without uploads writes nothing at submission, yet the job would fail on its
    first write: the store is checked before the job is queued."""
    before = job_total(http)
    aside = api_server.artifacts.with_name("artifacts-aside")
    api_server.artifacts.rename(aside)
    api_server.artifacts.write_text("a file where the store's folder was")
    try:
        answer = submit(http, SPEC)
    finally:
        api_server.artifacts.unlink()
        aside.rename(api_server.artifacts)

    assert answer.status_code == 503, answer.text
    assert one_line_detail(answer).startswith("the service cannot write its files (")
    assert str(api_server.artifacts) not in answer.text
    assert str(api_server.artifacts) in wait_for_log(api_server, "/submitted in the artifact")
    assert job_total(http) == before
    assert submit(http, SPEC).status_code == 202  # and the store works again once restored


def test_a_long_unknown_id_is_echoed_cut_short(http: httpx.Client):
    for method, path in [
        *((method, "/v1/jobs/" + "a" * 20_000 + route) for method, route in JOB_ROUTES),
        ("DELETE", "/v1/devices/" + "b" * 5_000),
    ]:
        answer = http.request(method, path)
        assert answer.status_code == 404, path
        detail = one_line_detail(answer)
        assert len(detail) < 200 and "..." in detail


def test_a_device_that_would_time_otherwise_than_its_class_online_answers_409(
    http: httpx.Client,
):
    device = {"device_class": "api-alike", "host": "h", "threads": 1}
    first = http.post("/v1/devices", json=device)
    assert first.status_code == 201, first.text
    try:
        refused = http.post("/v1/devices", json=device | {"threads": 4})
        assert refused.status_code == 409
        assert one_line_detail(refused).startswith(
            "device class api-alike has agents online that time with torch on 1 thread, and "
            "this one would time with torch on 4 threads"
        )
        listed = [d["id"] for d in http.get("/v1/devices").json()["devices"]]
        assert listed.count(first.json()["id"]) == 1 and len(listed) == len(set(listed))
        other = device | {"device_class": "api-other", "threads": 4}
        assert http.post("/v1/devices", json=other).status_code == 201
    finally:
        for listed in http.get("/v1/devices").json()["devices"]:
            if listed["device_class"] in ("api-alike", "api-other"):
                http.delete(f"/v1/devices/{listed['id']}")


def test_deleting_a_device_that_does_not_exist_writes_nothing(
    http: httpx.Client, job_store: JobStore
):
    for device_id in ("nope", "0123456789ab", "b" * 5_000):
        before = set(job_store.client.scan_iter("archtree:device*"))
        answer = http.delete(f"/v1/devices/{device_id}")
        assert answer.status_code == 404, device_id
        assert one_line_detail(answer).startswith("no device")
        assert set(job_store.client.scan_iter("archtree:device*")) == before, device_id


def test_the_event_stream_words_errors_and_notes_as_the_job_does(
    http: httpx.Client, job_store: JobStore, tmp_path: Path
):
    job_id = job_store.create(SPEC)
    # As the engine words them, for `archtree prune`, and as a worker keeps them.
    RedisEventSink(job_store, job_id).emit("note", message="--width 3 is not used")
    error = "the budget cannot be met: raise --max-depth or --planned-steps"
    assert job_store.set_status_if_active(job_id, "failed", error)

    with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        data = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]

    job = http.get(f"/v1/jobs/{job_id}").json()
    assert (
        job["error"] == "the budget cannot be met: raise search.max_depth or search.planned_steps"
    )
    assert data[-1]["error"] == job["error"]
    assert [e["message"] for e in data if e["kind"] == "note"] == ["search.width 3 is not used"]
    assert job["progress"]["notes"] == ["search.width 3 is not used"]
    (listed,) = [j for j in http.get("/v1/jobs").json()["jobs"] if j["id"] == job_id]
    assert listed["progress"]["notes"] == job["progress"]["notes"]
    # The command line shows them in its own terms again.
    shown = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", "status", job_id, "--api", str(http.base_url)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ARCHTREE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert "note: --width 3 is not used" in shown.stdout
    assert "error: the budget cannot be met: raise --max-depth or --planned-steps" in shown.stdout


def test_a_bad_last_event_id_in_utf_8_is_echoed_as_sent(http: httpx.Client, job_store: JobStore):
    job_id = job_store.create(SPEC)

    answer = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "１２３".encode()})

    assert answer.status_code == 422
    assert one_line_detail(answer).startswith("Last-Event-ID '１２３' is not an event id")


BAD_EVENT_IDS = ["abc", "99999999999999999999999-0", "18446744073709551616-0", "1-2-3", "-1"]


@pytest.mark.parametrize("event_id", [*BAD_EVENT_IDS, "1-18446744073709551616"])
def test_a_bad_last_event_id_answers_422_before_the_stream_starts(
    event_id: str, http: httpx.Client, job_store: JobStore
):
    job_id = job_store.create(SPEC)

    answer = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": event_id})

    assert answer.status_code == 422
    assert f"Last-Event-ID {event_id!r} is not an event id" in one_line_detail(answer)


def test_jobs_are_listed_newest_first_in_pages(http: httpx.Client):
    created = [submit(http, SPEC).json()["id"] for _ in range(3)]

    first = http.get("/v1/jobs", params={"limit": 2}).json()
    second = http.get("/v1/jobs", params={"offset": 2, "limit": 2}).json()

    assert [job["id"] for job in first["jobs"]] == created[::-1][:2]
    assert second["jobs"][0]["id"] == created[0]
    assert first["total"] == second["total"] >= 3
    bad = http.get("/v1/jobs", params={"limit": 0})
    assert bad.status_code == 422 and "limit" in one_line_detail(bad)


def test_jobs_are_listed_by_status_newest_first_in_pages(http: httpx.Client):
    created = [submit(http, SPEC).json()["id"] for _ in range(3)]
    # No worker runs here: a cancelled queued job ends at once, the others stay queued.
    http.post(f"/v1/jobs/{created[1]}/cancel")
    everything = http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]

    def listed(**params: Any) -> dict[str, Any]:
        answer = http.get("/v1/jobs", params={"limit": 200, **params})
        assert answer.status_code == 200, answer.text
        return answer.json()

    for statuses in (["cancelled"], ["queued"], ["queued", "cancelled"], ["running"]):
        page = listed(status=statuses)
        expected = [job["id"] for job in everything if job["status"] in statuses]
        assert [job["id"] for job in page["jobs"]] == expected
        assert page["total"] == len(expected)
    assert created[1] in [job["id"] for job in listed(status="cancelled")["jobs"]]
    # Paged like the whole list: the second of the queued jobs, newest first.
    queued = listed(status="queued")["jobs"]
    second = listed(status="queued", offset=1, limit=1)
    assert [job["id"] for job in second["jobs"]] == [queued[1]["id"]]
    assert second["total"] == len(queued)
    bad = http.get("/v1/jobs", params={"status": "done"})
    assert bad.status_code == 422 and "status" in one_line_detail(bad)
    assert "'succeeded'" in one_line_detail(bad)


def test_a_query_parameter_a_route_does_not_take_answers_422_naming_those_it_takes(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess
):
    from archtree_cli.client import ArchtreeClient

    queued = submit(http, SPEC).json()["id"]
    assert http.post(f"/v1/jobs/{queued}/cancel").status_code == 202
    running = job_store.create(SPEC)
    job_store.set_status_if_active(running, "running")

    for method, path, said in [
        ("GET", "/v1/jobs?stauts=failed", "GET /v1/jobs has no query parameter 'stauts' (did "
         "you mean 'status'?): it takes offset, limit and status"),
        ("GET", "/v1/jobs?limit=2&page=2&sort=new", "GET /v1/jobs has no query parameters "
         "'page', 'sort': it takes offset, limit and status"),
        ("GET", f"/v1/jobs/{queued}?verbose=1", "GET /v1/jobs/{job_id} has no query parameter "
         "'verbose': it takes none; send it without a query string"),
        ("GET", f"/v1/jobs/{queued}/events?lastEventId=1-0", "GET /v1/jobs/{job_id}/events "
         "has no query parameter 'lastEventId': it takes none; send it without a query string"),
        ("POST", f"/v1/jobs/{running}/cancel?force=true", "POST /v1/jobs/{job_id}/cancel has "
         "no query parameter 'force': it takes none; send it without a query string"),
        ("GET", "/v1/devices?class=local", "GET /v1/devices has no query parameter 'class': it "
         "takes none; send it without a query string"),
    ]:  # fmt: skip
        answer = http.request(method, path)
        assert answer.status_code == 422, (path, answer.text)
        assert one_line_detail(answer) == said
        if method == "GET":
            head = http.head(path)
            assert (head.status_code, head.content) == (422, b""), path
    job = job_store.get(running)
    assert job["status"] == "running" and not job["cancel_requested"]

    # What the dashboard and the command line send is taken, HEAD and the events' header too.
    listed = http.get("/v1/jobs?offset=0&limit=10&status=cancelled&status=failed")
    assert listed.status_code == 200 and queued in [job["id"] for job in listed.json()["jobs"]]
    assert http.head("/v1/jobs?offset=0&limit=10&status=cancelled").status_code == 200
    with ArchtreeClient(api_server.url) as client:
        assert client.jobs(offset=0, limit=5, statuses=["cancelled", "queued"])["total"] >= 1
        events = list(client.events(queued))  # and after an event id, as on a reconnect
        assert events[-1][1]["status"] == "cancelled"
        assert list(client.events(queued, after=events[0][0])) == events[1:]
    for path in ["/healthz?probe=1", "/?tab=jobs", "/docs?x=1", "/openapi.json?v=2"]:
        assert http.get(path).status_code == 200, path  # probes and pages are not API calls
    parameters = http.get("/openapi.json").json()["paths"]["/v1/jobs"]["get"]["parameters"]
    assert [parameter["name"] for parameter in parameters] == ["offset", "limit", "status"]


@pytest.mark.parametrize(
    "params",
    [{"offset": 2**63 - 1}, {"offset": 10**20}, {"offset": 2**63 - 2, "limit": 200}],
    ids=["2**63-1", "10**20", "overflowing the page end"],
)
def test_an_offset_past_its_bound_answers_422(params: dict[str, int], http: httpx.Client):
    answer = http.get("/v1/jobs", params=params)

    assert answer.status_code == 422
    assert "offset must be at most 1,000,000,000" in one_line_detail(answer)
    assert http.get("/v1/jobs", params={"offset": 10**9}).json()["jobs"] == []


def test_a_bad_query_value_is_named_as_its_parameter(http: httpx.Client):
    answer = http.get("/v1/jobs", params={"status": ["failed", "FAILED"], "limit": "many"})

    assert answer.status_code == 422
    detail = one_line_detail(answer)
    assert detail.startswith("limit: Input should be a valid integer"), detail
    assert detail.endswith("(and 1 more: status)"), detail

    # A parameter that takes one value, given twice: which one was meant is unknown.
    answer = http.get("/v1/jobs?limit=1&limit=2")
    assert answer.status_code == 422
    assert one_line_detail(answer) == "the query parameter 'limit' is given 2 times: give it once"
    assert http.get("/v1/jobs?status=failed&status=queued&limit=1").status_code == 200


def test_a_submission_with_two_idempotency_keys_is_refused_and_creates_no_job(
    http: httpx.Client,
):
    before = job_total(http)
    headers = [("Idempotency-Key", "key-one"), ("Idempotency-Key", "key-two")]

    answer = http.post("/v1/jobs", data={"spec": json.dumps(SPEC)}, headers=headers)

    assert answer.status_code == 422
    assert one_line_detail(answer) == (
        "the Idempotency-Key header is sent 2 times: send one key per submission"
    )
    assert job_total(http) == before


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

        # With its last device deleted and nothing waiting, the class is no longer listed.
        assert http.delete(f"/v1/devices/{registered[1]['id']}").status_code == 204
        assert "api-cpu" not in http.get("/v1/devices").json()["queue_depth"]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()


def test_a_device_with_a_bad_class_is_refused_and_a_long_one_is_echoed_cut_short(
    http: httpx.Client,
):
    answer = http.post("/v1/devices", json={"device_class": "has space", "host": "h"})

    assert answer.status_code == 422
    assert "invalid device class 'has space'" in one_line_detail(answer)
    long = http.post("/v1/devices", json={"device_class": "c" * 100_000, "host": "h"})
    assert long.status_code == 422
    assert f"invalid device class '{'c' * 61}...'" in one_line_detail(long)
    assert len(long.content) < 500


BAD_DEVICES = {
    "an unknown field": ({"evil": 1}, "evil: Extra inputs are not permitted"),
    "a chosen id": ({"id": "fixed", "online": False}, "Extra inputs are not permitted"),
    "threads past 64 bits": ({"threads": 99999999999999999999}, "threads must be at most 1,024"),
    "threads as a boolean": ({"threads": True}, "threads: Input should be a valid integer"),
    "threads over 1024": ({"threads": 1025}, "threads must be at most 1,024"),
    "an empty host": ({"host": ""}, "host: String should have at least 1 character"),
    "a long host": ({"host": "h" * 256}, "host: String should have at most 255 characters"),
    "a host with a line break": (
        {"host": "rpi\n07"},
        "host: holds the control character U+000A at character 4: send one line of printable text",
    ),
    "a host with an escape": ({"host": "\x1b[31mrpi"}, "host: holds the control character U+001B"),
    "a cpu with a bidi override": ({"cpu": "A72\u202e"}, "cpu: holds the control character U+202E"),
    "a gpu with a line separator": ({"gpu": "a\u2028b"}, "gpu: holds the control character U+2028"),
    "a runtime version with a NUL": (
        {"runtime_version": "2.1\x00"},
        "runtime_version: holds the control character U+0000",
    ),
    "an allowed module that is no package name": (
        {"allowed_modules": ["mynets", "../evil"]},
        "allowed_modules: '../evil' is not a Python package name (like mynets.models)",
    ),
    "allowed modules that are no list": (
        {"allowed_modules": "mynets"},
        "allowed_modules: Input should be a valid list",
    ),
    "an empty runtime": ({"runtime": ""}, "runtime: unsupported agent runtime ''; supported "),
    "an unknown runtime": (
        {"runtime": "onnx"},
        "runtime: unsupported agent runtime 'onnx'; supported runtimes: torch",
    ),
    "a long runtime": ({"runtime": "r" * 256}, "runtime: String should have at most 255"),
}


@pytest.mark.parametrize("case", BAD_DEVICES, ids=list(BAD_DEVICES))
def test_a_device_registration_is_refused_past_its_bounds(case: str, http: httpx.Client):
    changes, expected = BAD_DEVICES[case]
    before = len(http.get("/v1/devices").json()["devices"])

    answer = http.post("/v1/devices", json={"device_class": "api-cpu", "host": "h", **changes})

    assert answer.status_code == 422, answer.text
    assert expected in one_line_detail(answer)
    assert len(http.get("/v1/devices").json()["devices"]) == before


BAD_DEVICE_BODIES = {
    "JSON cut short": (b'{"device_class":', "application/json", "not valid JSON"),
    "form-encoded": (
        b'{"device_class": "x", "host": "h"}',
        "application/x-www-form-urlencoded",
        "the body is sent as application/x-www-form-urlencoded, not read as JSON",
    ),
    "plain text": (
        b'{"device_class": "x", "host": "h"}',
        "text/plain; charset=utf-8",
        "the body is sent as text/plain, not read as JSON",
    ),
    "a list": (b"[]", "application/json", "the body is not a JSON object"),
    "a field given twice": (
        b'{"device_class": "api-one", "device_class": "api-two", "host": "h"}',
        "application/json",
        'the body gives "device_class" 2 times in one object: give each field once',
    ),
    "fields missing": (
        b"{}",
        "application/json",
        "device_class: Field required (and 1 more: host)",
    ),
    "not UTF-8": (b"\xff{}", "application/json", "cannot be read as JSON text (is it UTF-8?)"),
}


@pytest.mark.parametrize("case", BAD_DEVICE_BODIES, ids=list(BAD_DEVICE_BODIES))
def test_a_device_body_that_is_no_json_object_says_to_send_one(case: str, http: httpx.Client):
    body, content_type, expected = BAD_DEVICE_BODIES[case]

    before = len(http.get("/v1/devices").json()["devices"])

    answer = http.post("/v1/devices", content=body, headers={"Content-Type": content_type})

    assert answer.status_code == 422
    detail = one_line_detail(answer)
    assert expected in detail
    if "not" in expected:
        assert f"send a JSON object like {DEVICE_EXAMPLE}" in detail
    assert len(http.get("/v1/devices").json()["devices"]) == before


def test_health_readiness_and_metrics(http: httpx.Client):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["redis"] is True and ready.json()["workers"] == []
    # Ready, since jobs can be queued; but whoever looks is told that none would run.
    assert "no Celery worker answered" in ready.json()["detail"]

    device = http.post("/v1/devices", json={"device_class": "api-metrics", "host": "h"}).json()
    try:
        metrics = http.get("/metrics")
    finally:
        http.delete(f"/v1/devices/{device['id']}")

    assert metrics.headers["content-type"].startswith("text/plain")
    assert "archtree_redis_up 1.0" in metrics.text
    assert 'archtree_jobs{status="queued"}' in metrics.text
    assert 'archtree_measurement_queue_depth{device_class="api-metrics"} 0.0' in metrics.text
    assert 'archtree_agents_online{device_class="api-metrics"} 1.0' in metrics.text


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


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private redis-server for one test, which the test may stop (started as
    tests/redis_fixtures.py starts the session's)."""
    executable = redis_server_executable()
    if executable is None:
        pytest.skip("redis-server is not on the PATH")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with open(tmp_path / "redis.log", "wb") as log:
        server = subprocess.Popen(
            [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(tmp_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def answers_ping() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    try:
        wait_until(answers_ping, 10, "a private redis-server")
        yield url, server
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
        server.wait()


@contextmanager
def client_of_api_on(url: str, tmp_path: Path) -> Iterator[httpx.Client]:
    """A client of an API process of its own on the Redis at `url`."""
    api = start_api(api_env(url, tmp_path), tmp_path / "logs")
    try:
        with api.client() as client:
            yield client
    finally:
        api.stop()


def test_data_routes_answer_503_while_redis_is_down(
    own_redis: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
):
    url, server = own_redis
    with client_of_api_on(url, tmp_path) as client:
        job_id = JobStore(redis.Redis.from_url(url)).create(SPEC)
        device = client.post("/v1/devices", json={"device_class": "api-cpu", "host": "h"})
        assert device.status_code == 201
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=10)

        for method, path, body in [
            *((method, f"/v1/jobs/{job_id}{route}", {}) for method, route in JOB_ROUTES),
            ("GET", "/v1/jobs", {}),
            ("POST", "/v1/jobs", {"data": {"spec": json.dumps(SPEC)}}),
            ("GET", "/v1/devices", {}),
            ("POST", "/v1/devices", {"json": {"device_class": "api-cpu", "host": "h"}}),
            ("DELETE", f"/v1/devices/{device.json()['id']}", {}),
        ]:
            answer = client.request(method, path, **body)
            assert answer.status_code == 503, (method, path, answer.text)
            detail = one_line_detail(answer)
            assert detail == (
                "the service cannot reach its Redis (ConnectionError); try again shortly, or "
                "ask the operator to check ARCHTREE_REDIS_URL"
            )  # its address, which the error named, is the operator's: in the API's log
        assert client.get("/readyz").status_code == 503


def test_writes_a_full_redis_refuses_answer_503(
    own_redis: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
):
    url, _ = own_redis
    with client_of_api_on(url, tmp_path) as client:
        store = redis.Redis.from_url(url)
        store.config_set("maxmemory-policy", "noeviction")
        store.config_set("maxmemory", 1)  # every write is now refused: out of memory
        for method, path, body in [
            ("POST", "/v1/jobs", {"data": {"spec": json.dumps(SPEC)}}),
            ("POST", "/v1/devices", {"json": {"device_class": "api-cpu", "host": "h"}}),
        ]:
            answer = client.request(method, path, **body)
            assert answer.status_code == 503, (method, path, answer.text)
            detail = one_line_detail(answer)
            assert detail.startswith("the service has a Redis that cannot serve now (")
            assert "OutOfMemoryError" in detail or "ExecAbortError" in detail
        store.config_set("maxmemory", 0)
        assert client.post("/v1/jobs", data={"spec": json.dumps(SPEC)}).status_code == 202


def test_unknown_routes_and_methods_say_what_exists(http: httpx.Client, job_store: JobStore):
    job_id = job_store.create(SPEC)

    for path in ["/nope", "/dashboard/nope.js", "/v1/jobs/a%2Fb"]:
        answer = http.get(path)
        assert answer.status_code == 404, path
        assert "see /docs for the endpoints" in one_line_detail(answer)
    for method, path, allowed in [
        ("POST", f"/v1/jobs/{job_id}", "GET, DELETE"),
        ("GET", f"/v1/jobs/{job_id}/cancel", "POST"),
        ("DELETE", "/v1/devices", "GET, POST"),
    ]:
        answer = http.request(method, path)
        assert answer.status_code == 405, path
        assert answer.headers["allow"] == allowed
        detail = one_line_detail(answer)
        assert f"use {allowed.replace(', ', ' or ')}; see /docs for the endpoints" in detail


def test_an_api_address_with_a_path_the_api_does_not_have_is_said_to_be_the_fix(
    api_server: ApiProcess, tmp_path: Path
):
    from archtree_cli.client import ArchtreeClient

    url = api_server.url
    listed = run_archtree("jobs", "--api", f"{url}/archtree", home=tmp_path)
    shown = run_archtree("status", "4f1c2a9be07d", "--api", f"{url}/a/b/", home=tmp_path)

    assert one_line_error(listed) == (
        f"archtree: error: no Archtree API at {url}/archtree (nothing at /archtree/v1/jobs): "
        f"give --api the API's root address, such as {url}"
    )
    assert one_line_error(shown) == (
        f"archtree: error: no Archtree API at {url}/a/b (nothing at /a/b/v1/jobs/4f1c2a9be07d): "
        f"give --api the API's root address, such as {url}"
    )
    with ArchtreeClient(f"{url}/archtree") as client, pytest.raises(ArchtreeError) as refused:
        client.devices()
    assert str(refused.value).endswith(f"give the API URL the API's root address, such as {url}")
    # At the right address, a job that is not there is still said to be the job's problem.
    with ArchtreeClient(url) as client, pytest.raises(ArchtreeError) as missing:
        client.job("4f1c2a9be07d")
    assert str(missing.value).startswith("no job '4f1c2a9be07d'")


def test_a_trailing_slash_answers_404_naming_the_path_without_it(
    http: httpx.Client, job_store: JobStore
):
    job_id = job_store.create(SPEC)
    before = job_total(http), http.get("/v1/devices").json()["devices"]

    for method, path, body in [
        ("GET", "/v1/jobs/", {}),
        ("POST", "/v1/jobs/", {"data": {"spec": json.dumps(SPEC)}}),
        ("GET", f"/v1/jobs/{job_id}/", {}),
        ("GET", f"/v1/jobs/{job_id}/artifacts/report.json/", {}),
        ("POST", f"/v1/jobs/{job_id}/cancel/", {}),
        ("GET", "/v1/devices/", {}),
        ("POST", "/v1/devices/", {"json": {"device_class": "api-cpu", "host": "h"}}),
        ("GET", "/healthz/", {}),
    ]:
        answer = http.request(method, path, **body)
        assert answer.status_code == 404, (method, path, answer.text)
        assert one_line_detail(answer) == (
            f"no route {path!r}: did you mean {path.rstrip('/')!r}? (paths end without a "
            "slash; see /docs for the endpoints)"
        )
    assert (job_total(http), http.get("/v1/devices").json()["devices"]) == before
    assert job_store.get(job_id)["status"] == "queued"
    assert "nothing at '/nope/'" in one_line_detail(http.get("/nope/"))
    # The dashboard's page and files are where its links point, without redirects.
    for path in ("/", "/dashboard/app.js", "/dashboard/style.css", "/docs"):
        assert http.get(path).status_code == 200, path


def test_head_answers_every_get_route_with_the_gets_status_and_headers(
    http: httpx.Client, job_store: JobStore, api_server: ApiProcess
):
    succeeded = job_store.create(SPEC)
    job_store.set_status_if_active(succeeded, "succeeded")
    for name in ARTIFACT_NAMES:
        stored = api_server.artifacts / result_name(succeeded, name)
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(b"{}" if name.endswith(".json") else os.urandom(3000))
    paths = http.get("/openapi.json").json()["paths"]
    get_paths = [
        path.format(job_id=succeeded, name=name, device_id="none")
        for path, operations in paths.items()
        if "get" in operations
        for name in (ARTIFACT_NAMES if "{name}" in path else [""])
    ]
    assert {"/v1/devices", "/metrics"} <= set(get_paths)  # every GET route the schema lists
    extra = ["/", "/dashboard/app.js", "/docs", "/openapi.json", f"/v1/jobs/{succeeded}a"]

    for path in get_paths + extra:
        get, head = http.get(path), http.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        for header in ("content-type", "content-length", "content-disposition"):
            assert head.headers.get(header) == get.headers.get(header), (path, header)
    assert http.head(f"/v1/jobs/{succeeded}/cancel").status_code == 405
    # A running job's events go on: HEAD answers at once, and the connection serves the next
    # request (the stream behind it is not left running).
    running = job_store.create(SPEC)
    job_store.set_status_if_active(running, "running")
    with api_server.client() as client:
        events = client.head(f"/v1/jobs/{running}/events")
        assert events.status_code == 200
        assert events.headers["content-type"].startswith("text/event-stream")
        assert client.get("/healthz", timeout=20).status_code == 200


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
    assert body["schema"]["additionalProperties"] is False  # other form fields are refused
    operations = [op for path in schema["paths"].values() for op in path.values()]
    ids = [operation["operationId"] for operation in operations]
    assert len(ids) == len(set(ids))
    events = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]
    assert list(events["200"]["content"]) == ["text/event-stream"]
    for status in ("404", "422", "503"):  # its errors are JSON, as sent
        assert list(events[status]["content"]) == ["application/json"], status
    device = schema["components"]["schemas"]["DeviceIn"]["properties"]["device_class"]
    assert (device["maxLength"], device["pattern"]) == (64, "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
    runtime = schema["components"]["schemas"]["DeviceIn"]["properties"]["runtime"]
    assert runtime["enum"] == ["torch"]
    assert http.get("/docs").status_code == 200


def progress_fields_the_workers_write() -> set[str]:
    """The fields of a job's progress that the workers' code writes (the keywords of its
    `update_progress` calls), read from their source."""
    written = set()
    for path in (ROOT / "workers").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update_progress"
            ):
                written.update(keyword.arg for keyword in node.keywords if keyword.arg)
    return written


def test_the_schema_declares_every_progress_field_the_workers_write(
    http: httpx.Client, job_store: JobStore
):
    schema = http.get("/openapi.json").json()["components"]["schemas"]["JobProgress"]
    written = progress_fields_the_workers_write()

    assert {"started_at", "device_wait_since", "depth", "final"} <= written
    assert written - set(schema["properties"]) == set()
    assert all(schema["properties"][name].get("description") for name in written)
    job_id = job_store.create(SPEC, notes=["search.width 3 is not used"])
    job_store.update_progress(job_id, started_at=1732660000.5, device_wait_since=None)
    progress = http.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert set(progress) <= set(schema["properties"])
    assert progress["started_at"] == 1732660000.5


def test_the_schema_declares_the_answer_while_redis_is_unreachable(http: httpx.Client):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/devices"):
        for operation in paths[path].values():
            assert "503" in operation["responses"], (path, operation["summary"])
    cancel = paths["/v1/jobs/{job_id}/cancel"]["post"]["responses"]
    assert "409" in cancel


def test_submit_warns_when_no_worker_will_run_the_job(
    api_server: ApiProcess, job_store: JobStore, tmp_path: Path
):
    """No worker runs beside this module's API: the job is accepted and waits in the queue."""
    submitted = subprocess.run(
        [sys.executable, "-m", "archtree_cli.main", "submit", "--api", api_server.url,
         "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "ARCHTREE_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert "warning: no worker of the service answered" in submitted.stderr
    assert "`archtree worker`" in submitted.stderr
    # The job keeps the address its client reached the API at, for the commands it suggests.
    assert job_store.get(submitted.stdout.strip())["api_url"] == api_server.url


def test_readiness_names_a_queue_no_worker_takes(own_redis, tmp_path: Path):
    """Workers started for one queue only left the other's jobs waiting, 'queued' or
    'evaluating' for ever, while /readyz said ready with nothing to add."""
    url, _ = own_redis
    env = api_env(url, tmp_path)
    api = start_api(env, tmp_path / "logs")
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "archtree_cli.main", "worker", "--queues", "search",
             "--name", "only-search@%h"],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with api.client() as client:

            def worker_seen() -> dict[str, Any] | None:
                ready = client.get("/readyz").json()
                return ready if ready["workers"] else None

            ready = wait_until(worker_seen, 60, "the worker answering")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        api.stop()
    assert ready["workers"][0].startswith("only-search@")
    assert ready["detail"] == (
        "no worker answering takes the 'evaluate' queue: its jobs wait there until one does "
        "(`archtree worker --queues evaluate`, or without --queues for every queue)"
    )
