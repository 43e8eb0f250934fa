"""`archtree submit`, `status` and `fetch` against servers that are no Archtree API: real HTTP
servers in threads of this process, the real command line in subprocesses.

Each failure must be one line naming the URL (exit 2, never a traceback or "internal error"),
and a failed `fetch` must leave the destination folder exactly as it was.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from archtree_cli.cli_terms import in_cli_terms
from archtree_cli.client import (
    API_TIMEOUT_VARIABLE,
    ARTIFACT_NAMES,
    EVENT_RECONNECTS,
    SUBMIT_ATTEMPTS,
    ArchtreeClient,
)
from archtree_cli.service_commands import pruned_text
from search.errors import ArchtreeError
from tests.cli_process import ROOT, run_archtree
from tests.http_servers import serving

pytest_plugins = ["tests.redis_fixtures"]

JOB = "4f1c2a9be07d"
# Seconds the client waits for an answer in these tests: the servers here answer at once, or
# never.
API_TIMEOUT_S = "1"
HTML_PAGE = b"<!DOCTYPE html><html><body>Welcome to nginx! Please log in.</body></html>"
TINY_PRUNE = [
    "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "80%",
    "--ft-steps", "1", "--final-epochs", "0", "--select-steps", "1", "--select-top", "1",
    "--fill-probes", "0", "--bn-samples", "0", "--widen-to", "0", "--strategy", "greedy",
    "--branching", "1", "--planned-steps", "1",
]  # fmt: skip
SUBMIT = ["submit", "--model", "builtin:vgg", "--data", "builtin:digits", "--budget", "60%"]

# status, content type, body
Answer = tuple[int, str, bytes]


def archtree(*args: str, home: Path, api_timeout_s: str = API_TIMEOUT_S):
    return run_archtree(
        *args,
        home=home,
        env={API_TIMEOUT_VARIABLE: api_timeout_s},
        drop=("ARCHTREE_API_URL",),
    )


def command_args(command: str, tmp_path: Path) -> list[str]:
    """The arguments of `command` in COMMANDS, its OUT a folder under `tmp_path`."""
    return [str(tmp_path / "out") if arg == "OUT" else arg for arg in COMMANDS[command]]


def one_error_line(result: subprocess.CompletedProcess, *words: str, notes: bool = False) -> str:
    """The single `archtree: error:` line of a failed command, once it holds every word;
    `notes` allows other `archtree:` lines (what `status --watch` says while it retries)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "internal error" not in output, output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("archtree: error:")]
    assert len(errors) == 1, output
    if not notes:
        assert lines == errors, output
    assert all(line.startswith("archtree: ") for line in lines), output
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, hidden ones included, by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def answering(answer_for: Callable[[str], Answer]) -> type[BaseHTTPRequestHandler]:
    """A handler that answers every GET and POST with `answer_for(path)`."""

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, media, body = answer_for(self.path)
            self.send_response(status)
            self.send_header("Content-Type", media)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = answer

        def log_message(self, *_: object) -> None:
            pass

    return Handler


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def result_dir(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Path:
    """A real result of `archtree prune`, from the smallest search it runs."""
    out = tmp_path_factory.mktemp("result") / "pruned"
    pruned = archtree("prune", *TINY_PRUNE, "--out", str(out), home=home)
    assert pruned.returncode == 0, pruned.stderr
    return out


@pytest.fixture(scope="module")
def html_api() -> Iterator[str]:
    """Answers 200 with an HTML page to everything, like a login page or a proxy."""
    with serving(answering(lambda _: (200, "text/html", HTML_PAGE))) as url:
        yield url


@pytest.fixture(scope="module")
def html_404_api() -> Iterator[str]:
    """Answers 404 with an HTML page to everything, like `python -m http.server`."""
    with serving(answering(lambda _: (404, "text/html", HTML_PAGE))) as url:
        yield url


@pytest.fixture(scope="module")
def silent_api() -> Iterator[str]:
    """Accepts connections and never answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        for connection in held:
            connection.close()


@pytest.fixture(scope="module")
def result_api(result_dir: Path) -> Iterator[str]:
    """Serves the result of job JOB as the Archtree API does, under /good; under /truncated
    with the weights cut short, under /garbled with a report.json that is no JSON, under
    /foreign with one that is no Archtree report; and a JSON
    404 like the API's for anything else."""
    files = {name: (result_dir / name).read_bytes() for name in ARTIFACT_NAMES}
    variants = {
        "good": files,
        "truncated": {**files, "model.safetensors": files["model.safetensors"][:-100]},
        "garbled": {**files, "report.json": b'{"baseline": '},
        "foreign": {**files, "report.json": b"{}"},
    }

    def answer_for(path: str) -> Answer:
        variant, _, rest = path.lstrip("/").partition("/")
        name = rest.removeprefix(f"v1/jobs/{JOB}/artifacts/")
        if variant in variants and name in ARTIFACT_NAMES:
            media = "application/json" if name.endswith(".json") else "application/octet-stream"
            return 200, media, variants[variant][name]
        detail = {"detail": f"no job at {path}: submit one with POST /v1/jobs"}
        return 404, "application/json", json.dumps(detail).encode()

    with serving(answering(answer_for)) as url:
        yield url


def test_fetch_writes_the_three_files_the_api_serves(
    result_api: str, result_dir: Path, home: Path, tmp_path: Path
):
    out = tmp_path / "fetched"
    # Given with a trailing slash, as the README writes it: said with one.
    fetched = archtree("fetch", JOB, "--api", f"{result_api}/good", "--out", f"{out}/", home=home)

    assert fetched.returncode == 0, fetched.stderr
    assert f"saved to {out}/ (" in fetched.stdout
    # The table comes first, with no blank line above it.
    assert fetched.stdout.splitlines()[0].split() == ["unpruned", "pruned"], fetched.stdout
    assert snapshot(out) == snapshot(result_dir)
    assert [path.name for path in tmp_path.iterdir()] == ["fetched"]


# (the API fixture, the path under it, words the error line must hold)
REFUSED_RESULTS = {
    "html-200": ("html_api", "", ["did not send an Archtree result", "text/html", "check --api"]),
    "html-404": ("html_404_api", "", ["HTTP 404", "text/html", "check --api"]),
    "truncated": ("result_api", "/truncated", ["model.safetensors is not a safetensors file"]),
    "garbled": ("result_api", "/garbled", ["report.json is not JSON", "check --api"]),
    "foreign": ("result_api", "/foreign", ["report.json has no budget_ms, inputs, baseline"]),
    "silent": ("silent_api", "", [f"did not answer within {API_TIMEOUT_S} s", "check --api"]),
}


@pytest.mark.parametrize("server", REFUSED_RESULTS)
def test_failed_fetch_overwrite_leaves_the_old_result_byte_for_byte(
    server: str, request: pytest.FixtureRequest, result_dir: Path, home: Path, tmp_path: Path
):
    fixture, under, words = REFUSED_RESULTS[server]
    api = request.getfixturevalue(fixture) + under
    victim = tmp_path / "victim"
    shutil.copytree(result_dir, victim)
    before = snapshot(victim)

    fetched = archtree("fetch", JOB, "--api", api, "--out", str(victim), "--overwrite", home=home)

    one_error_line(fetched, api, *words)
    assert snapshot(victim) == before
    assert [path.name for path in tmp_path.iterdir()] == ["victim"]


def test_fetch_refuses_a_folder_where_a_result_file_goes_before_touching_any_file(
    result_api: str, home: Path, tmp_path: Path
):
    out = tmp_path / "mixed"
    (out / "model.safetensors").mkdir(parents=True)
    (out / "model.safetensors" / "notes.txt").write_text("the user's own file")
    (out / "arch.json").write_text('{"mine": true}')
    before = snapshot(out)

    fetched = archtree(
        "fetch", JOB, "--api", f"{result_api}/good", "--out", str(out), "--overwrite", home=home
    )

    one_error_line(fetched, f"{out / 'model.safetensors'} is a folder", "choose another --out")
    assert snapshot(out) == before
    assert sorted(path.name for path in out.iterdir()) == ["arch.json", "model.safetensors"]


def test_fetch_from_python_names_its_arguments_where_the_command_line_names_its_options(
    result_api: str, result_dir: Path, tmp_path: Path
):
    out = tmp_path / "held"
    shutil.copytree(result_dir, out)
    (tmp_path / "folder" / "model.safetensors").mkdir(parents=True)

    with ArchtreeClient(f"{result_api}/good") as client:
        with pytest.raises(ArchtreeError) as held:
            client.fetch(JOB, out)
        with pytest.raises(ArchtreeError) as folder:
            client.fetch(JOB, tmp_path / "folder", overwrite=True)
        replaced = client.fetch(JOB, out, overwrite=True)

    assert str(held.value) == (
        f"{out} already holds a result (arch.json, model.safetensors, report.json): choose "
        "another out_dir, or pass overwrite=True to replace it"
    )
    assert str(folder.value).endswith("goes: move it away, or choose another out_dir.")
    assert [path.name for path in replaced] == list(ARTIFACT_NAMES)
    # `archtree fetch` passes its options as these arguments: it names the options.
    assert in_cli_terms(str(held.value)).endswith(
        "choose another --out, or pass --overwrite to replace it"
    )
    assert in_cli_terms(str(folder.value)).endswith("or choose another --out.")


@pytest.mark.parametrize("server", ["html-200", "truncated"])
def test_failed_fetch_into_a_new_folder_leaves_nothing_behind(
    server: str, request: pytest.FixtureRequest, home: Path, tmp_path: Path
):
    fixture, under, words = REFUSED_RESULTS[server]
    api = request.getfixturevalue(fixture) + under
    out = tmp_path / "new" / "pruned"

    fetched = archtree("fetch", JOB, "--api", api, "--out", str(out), home=home)

    one_error_line(fetched, api, *words)
    assert list(tmp_path.iterdir()) == []


COMMANDS = {
    "submit": SUBMIT,
    "status": ["status", JOB],
    "status --watch": ["status", JOB, "--watch"],
    "fetch": ["fetch", JOB, "--out", "OUT"],
    "delete": ["delete", JOB],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fixture", ["html_api", "html_404_api"])
def test_a_server_that_is_no_archtree_api_gets_one_line_naming_it(
    command: str, fixture: str, request: pytest.FixtureRequest, home: Path, tmp_path: Path
):
    api = request.getfixturevalue(fixture)
    args = command_args(command, tmp_path)

    result = archtree(*args, "--api", api, home=home)

    line = one_error_line(result, f"the server at {api}", "text/html", "check --api")
    assert "DOCTYPE" not in result.stderr and "<" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_the_apis_own_error_detail_is_shown(
    command: str, result_api: str, home: Path, tmp_path: Path
):
    args = command_args(command, tmp_path)

    result = archtree(*args, "--api", f"{result_api}/elsewhere", home=home)

    one_error_line(result, "no job at /elsewhere/v1/jobs", "submit one with POST /v1/jobs")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("api", ["ftp://x", "notaurl", "http://[::1"])
def test_a_malformed_api_url_is_refused_before_any_request(
    command: str, api: str, home: Path, tmp_path: Path
):
    args = command_args(command, tmp_path)

    result = archtree(*args, "--api", api, home=home)

    one_error_line(
        result, "--api must be an http:// or https:// URL like http://127.0.0.1:8000", repr(api)
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("api", "said"),
    [
        ("http://127.0.0.1:8000?x=1", "has a query, which no API address has"),
        ("http://127.0.0.1:8000/#jobs", "has a fragment, which no API address has"),
        ("http://127.0.0.1:8000/?", "has a query, which no API address has"),
    ],
)
def test_an_api_url_with_a_query_or_fragment_is_refused_with_the_bare_address(api: str, said: str):
    """A query sends every request to whatever the address answers with it (the dashboard),
    which would then be blamed for not being an Archtree API."""
    with pytest.raises(ArchtreeError) as refused:
        ArchtreeClient(api, source="--api")
    assert str(refused.value) == f"--api {api!r} {said}: give http://127.0.0.1:8000"


@pytest.mark.parametrize("job_id", ["..", "../../etc", "a/b"])
def test_a_path_given_as_a_job_id_is_refused_before_any_request(job_id: str):
    with pytest.raises(ArchtreeError) as refused:
        ArchtreeClient("http://127.0.0.1:9").job(job_id)
    assert "is not a job id: give the id `archtree submit` printed" in str(refused.value)


@pytest.mark.parametrize("command", ["submit", "status", "fetch"])
def test_an_api_that_never_answers_is_reported_after_the_timeout(
    command: str, silent_api: str, home: Path, tmp_path: Path
):
    args = command_args(command, tmp_path)

    result = archtree(*args, "--api", silent_api, home=home)

    one_error_line(
        result,
        f"the API at {silent_api} did not answer within {API_TIMEOUT_S} s",
        "check --api",
        "that the service is running",
        notes=command == "submit",
    )
    # The job may have been created: submit sends it again, which creates it once, and then
    # names the key that gets it without a second.
    sent_again = [line for line in result.stderr.splitlines() if "sending the job again" in line]
    assert len(sent_again) == (SUBMIT_ATTEMPTS - 1 if command == "submit" else 0), result.stderr
    send_again_hint = re.compile(
        r"the service may have created the job all the same: the same command with "
        r"--idempotency-key [0-9a-f]{32}, within a day, gets that job rather than a second"
    )
    assert bool(send_again_hint.search(result.stderr)) is (command == "submit"), result.stderr


def test_a_proxy_that_keeps_answering_502_gets_the_job_sent_again_under_one_key(home: Path):
    keys: list[str] = []

    class LostItsApi(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            keys.append(self.headers["Idempotency-Key"])
            self.send_response(502)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    with serving(LostItsApi) as proxy:
        result = archtree(*SUBMIT, "--idempotency-key", "nightly-42", "--api", proxy, home=home)

    assert keys == ["nightly-42"] * SUBMIT_ATTEMPTS
    error = one_error_line(result, "HTTP 502", notes=True)
    assert error.endswith(
        "the same command with --idempotency-key nightly-42, within a day, gets that job rather "
        "than a second (or creates it, if it was not)"
    )


def test_status_watch_says_it_is_retrying_an_api_that_never_answers(silent_api: str, home: Path):
    started = time.monotonic()
    watched = archtree("status", JOB, "--watch", "--api", silent_api, home=home)

    one_error_line(watched, f"did not answer within {API_TIMEOUT_S} s", notes=True)
    notes = [line for line in watched.stderr.splitlines() if "retrying" in line]
    assert len(notes) == EVENT_RECONNECTS, watched.stderr
    assert f"at {silent_api} sent nothing for {API_TIMEOUT_S} s" in notes[0]
    assert f"retrying (1 of {EVENT_RECONNECTS})" in notes[0]
    # One wait of the timeout per attempt, not minutes.
    assert time.monotonic() - started < 60


def test_ctrl_c_while_submit_awaits_the_answer_says_the_job_may_exist_and_how_to_find_it(
    home: Path,
):
    received = threading.Event()
    release = threading.Event()
    keys: list[str] = []

    class ReadsTheJobAndHoldsTheAnswer(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            keys.append(self.headers["Idempotency-Key"])
            received.set()
            release.wait(60)

        def log_message(self, *_: object) -> None:
            pass

    with serving(ReadsTheJobAndHoldsTheAnswer) as api:
        process = subprocess.Popen(
            [sys.executable, "-m", "archtree_cli.main", *SUBMIT, "--api", api],
            cwd=ROOT,
            env={
                **os.environ,
                "ARCHTREE_HOME": str(home),
                "PYTHONPATH": str(ROOT),
                API_TIMEOUT_VARIABLE: "60",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a group of its own, as a terminal's foreground job
        )
        try:
            assert received.wait(60), "the submission never arrived"
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            stdout, stderr = process.communicate(timeout=60)
        finally:
            release.set()
            process.kill()

    assert process.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "archtree: interrupted: the job was sent, though its id never arrived; the service may "
        f"have created the job all the same: the same command with --idempotency-key {keys[0]}, "
        "within a day, gets that job rather than a second (or creates it, if it was not)"
    )


def test_an_invalid_timeout_setting_is_one_line(html_api: str, home: Path):
    result = archtree("status", JOB, "--api", html_api, home=home, api_timeout_s="soon")

    one_error_line(result, f"{API_TIMEOUT_VARIABLE} must be a number of seconds above 0", "soon")


def job_record(job_id: str, status: str) -> dict[str, Any]:
    """A job as the API answers it, pruning the digits VGG to 60 %."""
    return {
        "id": job_id,
        "status": status,
        "spec": {"model": "builtin:vgg", "data": "builtin:digits", "budget": "60%",
                 "device_class": "local"},
        "progress": {},
    }  # fmt: skip


def send_job(handler: BaseHTTPRequestHandler, status: int, job: dict[str, Any]) -> None:
    """Answer `job` as JSON with HTTP `status`."""
    body = json.dumps(job).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class BreakingEventStream(BaseHTTPRequestHandler):
    """Job JOB's events, whose stream breaks off after the first event as when the API
    restarts; the stream resumed after it sends the last. Records each Last-Event-ID."""

    resumed_after: list[str | None] = []

    def do_GET(self) -> None:
        if self.path.endswith("/events"):
            after = self.headers.get("Last-Event-ID")
            type(self).resumed_after.append(after)
            status = "succeeded" if after else "running"
            data = json.dumps({"kind": "status", "status": status})
            event = f"id: {len(self.resumed_after)}-0\ndata: {data}\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if not after:  # promise more than is sent, then hang up
                self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(event.encode())
            return
        send_job(self, 200, job_record(JOB, "succeeded"))

    def log_message(self, *_: object) -> None:
        pass


def test_status_watch_resumes_an_event_stream_that_breaks_off(home: Path):
    BreakingEventStream.resumed_after.clear()
    with serving(BreakingEventStream) as api:
        watched = archtree("status", JOB, "--watch", "--api", api, home=home)

    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert watched.stdout.splitlines()[:2] == ["status running", "status succeeded"]
    assert f"job {JOB} succeeded" in watched.stdout
    assert f"result: `archtree fetch {JOB} --api {api} --out DIR` downloads it" in watched.stdout
    assert BreakingEventStream.resumed_after == [None, "1-0"]
    assert watched.stderr.splitlines() == [
        f"archtree: the events of job {JOB} at {api} broke off (RemoteProtocolError); "
        f"retrying (1 of {EVENT_RECONNECTS})"
    ]


class PingingThenBreakingStream(BreakingEventStream):
    """A quiet job's stream on an API that restarts more often than the retries in a row: each
    stream sends a keep-alive ping and breaks off, until the last one ends the job."""

    breaks = EVENT_RECONNECTS + 2
    connections = 0

    def do_GET(self) -> None:
        if not self.path.endswith("/events"):
            return super().do_GET()
        type(self).connections += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if type(self).connections <= self.breaks:
            self.send_header("Content-Length", "100000")  # promise more, then hang up
            self.end_headers()
            self.wfile.write(b": ping\n\n")
            return
        self.end_headers()
        data = json.dumps({"kind": "status", "status": "succeeded"})
        self.wfile.write(f"id: 1-0\ndata: {data}\n\n".encode())


def test_status_watch_counts_only_failures_in_a_row_of_streams_that_sent_nothing(home: Path):
    PingingThenBreakingStream.connections = 0
    with serving(PingingThenBreakingStream) as api:
        watched = archtree("status", JOB, "--watch", "--api", api, home=home)

    assert watched.returncode == 0, watched.stderr
    assert f"job {JOB} succeeded" in watched.stdout
    notes = [line for line in watched.stderr.splitlines() if "retrying" in line]
    assert len(notes) == PingingThenBreakingStream.breaks
    assert all(note.endswith(f"retrying (1 of {EVENT_RECONNECTS})") for note in notes)


class RestartingAsTheJobEnds(BaseHTTPRequestHandler):
    """Job JOB's events end with its success as the API restarts: the job read right after is
    answered 503 (the API without its Redis yet), the next one as usual."""

    reads = 0

    def do_GET(self) -> None:
        if self.path.endswith("/events"):
            data = json.dumps({"kind": "status", "status": "succeeded"})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(f"id: 1-0\ndata: {data}\n\n".encode())
            return
        type(self).reads += 1
        if type(self).reads == 1:
            return send_job(self, 503, {"detail": "the service cannot reach its Redis"})
        send_job(self, 200, job_record(JOB, "succeeded"))

    def log_message(self, *_: object) -> None:
        pass


def test_status_watch_reads_a_job_that_ended_as_the_api_restarted_once_it_is_back(home: Path):
    RestartingAsTheJobEnds.reads = 0
    with serving(RestartingAsTheJobEnds) as api:
        watched = archtree("status", JOB, "--watch", "--api", api, home=home)

    assert watched.returncode == 0, watched.stderr
    assert f"job {JOB} succeeded" in watched.stdout
    assert watched.stderr.splitlines() == [
        f"archtree: the API at {api} failed (HTTP 503: the service cannot reach its Redis); "
        f"retrying (1 of {EVENT_RECONNECTS})"
    ]


class DeletedWhileWatched(BaseHTTPRequestHandler):
    """Job JOB's events as the API sends them once another client has cancelled and deleted
    the job: its stream ends, after its final status or before it (deleted before the stream
    read it), and the job is no more (404)."""

    events: list[dict[str, Any]] = []
    streamed = False

    def do_GET(self) -> None:
        if type(self).streamed or not self.path.endswith("/events"):
            detail = f"no job '{JOB}': list the jobs with GET /v1/jobs"
            return send_job(self, 404, {"detail": detail})
        type(self).streamed = True
        body = "".join(f"id: {n}-0\ndata: {json.dumps(e)}\n\n" for n, e in enumerate(self.events))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("final_status_read", [False, True])
def test_status_watch_of_a_job_deleted_meanwhile_says_so_after_what_it_showed(
    final_status_read: bool, home: Path
):
    running = {"kind": "status", "status": "running"}
    cancelled = [{"kind": "cancel_requested"}, {"kind": "status", "status": "cancelled"}]
    events = [running, *cancelled] if final_status_read else [running]
    handler = type("Deleted", (DeletedWhileWatched,), {"events": events})
    with serving(handler) as api:
        watched = archtree("status", JOB, "--watch", "--api", api, home=home)

    assert watched.returncode == 2, watched.stdout + watched.stderr
    shown = watched.stdout.splitlines()
    assert shown[0] == "status running"
    assert (shown[-1] == "status cancelled") == final_status_read, watched.stdout
    # Its final status not read, the job may as well have been lost with the service's Redis.
    gone = (
        "was deleted while being watched, with its events and result files"
        if final_status_read
        else "is gone from the service, last seen running: it ended and was deleted meanwhile, "
        "or the service's Redis lost it (restarted without persistence, or flushed)"
    )
    assert watched.stderr.splitlines() == [
        f"archtree: error: job {JOB} {gone}: nothing of it is left to show; submit it again to "
        "run it anew"
    ]


ASKED = "a5c3d7e9f1b2"  # a running job whose cancel was asked for already; JOB's is not yet


class RunningJobs(BaseHTTPRequestHandler):
    """Jobs JOB and ASKED running on one busy worker: a cancel is recorded, and the job goes
    on running until a worker takes its next step. Their event streams stay open."""

    release = threading.Event()

    def do_GET(self) -> None:
        job_id = self.path.split("/")[3]
        if self.path.endswith("/events"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for number, event in enumerate(({"kind": "status", "status": "running"},
                                            {"kind": "cancel_requested"})):  # fmt: skip
                self.wfile.write(f"id: {number}-0\ndata: {json.dumps(event)}\n\n".encode())
            self.wfile.flush()
            self.release.wait(60)
            return
        self.send_job(job_id, cancel_requested=job_id == ASKED)

    def do_POST(self) -> None:
        self.send_job(self.path.split("/")[3], cancel_requested=True)

    def send_job(self, job_id: str, cancel_requested: bool) -> None:
        job = job_record(job_id, "running") | {"cancel_requested": cancel_requested}
        send_job(self, 202 if self.command == "POST" else 200, job)

    def log_message(self, *_: object) -> None:
        pass


def test_a_cancel_that_waits_for_the_jobs_next_step_is_said_honestly(home: Path):
    promise = "within a second or so when a worker is on it; a step still waiting for a free"
    with serving(RunningJobs) as api:
        first = archtree("cancel", JOB, "--api", api, home=home)
        again = archtree("cancel", ASKED, "--api", api, home=home)
        shown = archtree("status", ASKED, "--api", api, home=home)

    assert first.returncode == 0, first.stderr
    assert f"job {JOB} running, cancel requested: the job stops at its next step" in first.stdout
    assert promise in first.stdout and "ends within a second or so of" not in first.stdout
    assert again.returncode == 0, again.stderr
    assert f"job {ASKED} running, a cancel was already requested" in again.stdout
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"job {ASKED} running, cancel requested: builtin:vgg")


def test_ctrl_c_on_status_watch_of_a_job_being_cancelled_does_not_advise_cancel(home: Path):
    RunningJobs.release.clear()
    with serving(RunningJobs) as api:
        process = subprocess.Popen(
            [sys.executable, "-m", "archtree_cli.main", "status", ASKED, "--watch", "--api", api],
            cwd=ROOT,
            env={**os.environ, "ARCHTREE_HOME": str(home), "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a group of its own, as a terminal's foreground job
        )
        try:
            lines: queue.Queue[str] = queue.Queue()
            threading.Thread(
                target=lambda: [lines.put(x) for x in process.stdout], daemon=True
            ).start()
            assert lines.get(timeout=60) == "status running\n"
            assert lines.get(timeout=60).startswith("cancel requested: the job stops")
            os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            _, stderr = process.communicate(timeout=60)
        finally:
            RunningJobs.release.set()
            process.kill()

    assert process.returncode == 130, stderr
    assert "until its requested cancel takes effect, at its next step" in stderr
    assert "archtree cancel" not in stderr


class FailedJob(BaseHTTPRequestHandler):
    """Job JOB, failed with an error and a note in the job spec's terms, as the API words
    them for a REST client."""

    note = "search.width 3 is not used: search.strategy greedy runs with 1"
    error = (
        "the budget of 1.000 ms cannot be met: raise search.max_depth or "
        "search.planned_steps, or lower search.min_width_fraction or search.margin"
    )

    def do_GET(self) -> None:
        if self.path.endswith("/events"):
            events = [
                {"kind": "note", "message": self.note},
                {"kind": "status", "status": "failed"},
            ]
            body = "".join(f"id: {n}-0\ndata: {json.dumps(e)}\n\n" for n, e in enumerate(events))
            media = "text/event-stream"
        else:
            job = {
                "id": JOB,
                "status": "failed",
                "spec": {"model": "builtin:vgg", "data": "builtin:digits", "budget": "1ms",
                         "device_class": "local"},
                "progress": {"notes": [self.note]},
                "error": self.error,
            }  # fmt: skip
            body, media = json.dumps(job), "application/json"
        self.send_response(200)
        self.send_header("Content-Type", media)
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("watch", [[], ["--watch"]])
def test_status_shows_the_jobs_error_and_notes_in_the_command_lines_terms(
    watch: list[str], home: Path
):
    with serving(FailedJob) as api:
        shown = archtree("status", JOB, "--api", api, *watch, home=home)

    assert shown.returncode == (1 if watch else 0), shown.stderr
    assert "search." not in shown.stdout, shown.stdout
    note = "note: --width 3 is not used: --strategy greedy runs with 1"
    assert shown.stdout.count(note) == (2 if watch else 1), shown.stdout
    assert (
        "error: the budget of 1.000 ms cannot be met: raise --max-depth or --planned-steps, or "
        "lower --min-width or --margin"
    ) in shown.stdout


def test_submit_says_of_a_missing_file_what_prune_says(home: Path, tmp_path: Path):
    """Checked before any request: no API is needed to be told."""
    for option, given, said in [
        ("--data", "mnist", "data file 'mnist' does not exist; check the path, or give "
         "builtin:mnist for the builtin dataset"),
        ("--weights", str(tmp_path / "w.pt"), f"weights file '{tmp_path / 'w.pt'}' does not "
         "exist; check the path"),
    ]:  # fmt: skip
        result = run_archtree("submit", "--api", f"http://127.0.0.1:{free_port()}", "--model",
                              "builtin:resnet", "--budget", "70%", "--data", "builtin:digits",
                              option, given, home=home)  # fmt: skip
        assert one_error_line(result) == f"archtree: error: {said}"


def test_only_search_settings_are_named_as_options():
    from archtree_cli.cli_terms import in_cli_terms

    said = "raise search.max_depth or search.min_width_fraction; load it with search.load_pruned"
    assert in_cli_terms(said) == "raise --max-depth or --min-width; load it with search.load_pruned"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_api_address_from_the_environment_is_named_as_its_variable(home: Path):
    down = f"http://127.0.0.1:{free_port()}"
    for command in (["jobs"], ["status", JOB], ["cancel", JOB]):
        garbage = run_archtree(*command, home=home, env={"ARCHTREE_API_URL": "garbage"})
        one_error_line(garbage, "ARCHTREE_API_URL must be an http:// or https:// URL", "'garbage'")
        assert "--api" not in garbage.stderr
        unreachable = run_archtree(*command, home=home, env={"ARCHTREE_API_URL": down})
        one_error_line(unreachable, f"cannot reach the API at {down}", "check ARCHTREE_API_URL")
        given = run_archtree(*command, "--api", down, home=home, env={"ARCHTREE_API_URL": "x"})
        one_error_line(given, f"cannot reach the API at {down}", "or check --api")
        assert "ARCHTREE_API_URL" not in given.stderr


def test_an_unreachable_api_address_ending_in_v1_is_told_to_drop_it_too(home: Path):
    down = f"http://127.0.0.1:{free_port()}"

    result = run_archtree("jobs", "--api", f"{down}/v1", home=home)

    fix = f"give --api without its /v1 at the end: {down}"
    one_error_line(result, f"cannot reach the API at {down}/v1", fix)


def test_an_address_of_a_server_that_is_not_http_is_not_said_to_be_unreachable(
    redis_url: str, home: Path
):
    """--api pointed at a Redis (or another service's port): it answered, in its own
    protocol; the error says to check the address, not to start the API."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    redis_address = f"http://127.0.0.1:{port}"

    for command in (["jobs"], ["status", JOB], ["cancel", JOB]):
        result = run_archtree(*command, "--api", redis_address, home=home)

        line = one_error_line(
            result, f"the server at {redis_address} did not answer in HTTP", "names an Archtree API"
        )
        assert "cannot reach" not in line and "start it" not in line


def test_a_job_submitted_to_a_server_that_is_not_http_is_not_sent_again(redis_url: str, home: Path):
    """Nothing that speaks another protocol can have created the job: one error, at once,
    rather than three more sends as to an API that broke off its answer."""
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    redis_address = f"http://127.0.0.1:{port}"

    result = run_archtree("submit", "--api", redis_address, "--model", "builtin:resnet",
                          "--data", "builtin:digits", "--budget", "70%", home=home)  # fmt: skip

    one_error_line(
        result, f"the server at {redis_address} did not answer in HTTP", "names an Archtree API"
    )
    assert "sending the job again" not in result.stderr, result.stderr


def test_an_api_host_name_that_does_not_resolve_is_said_to_be_a_name_problem(home: Path):
    # .invalid never resolves (RFC 2606): the error says so, not that the API is down.
    with (
        ArchtreeClient("http://nosuchhost.invalid:8000") as client,
        pytest.raises(ArchtreeError) as raised,
    ):
        client.job(JOB)
    message = str(raised.value)
    assert "the host name 'nosuchhost.invalid' does not resolve" in message, message
    # From Python, the URL given; on the command line, its option.
    assert "check the API URL for a typo, or this machine's DNS" in message
    assert "archtree up" not in message
    result = run_archtree("jobs", "--api", "http://nosuchhost.invalid:8000", home=home)
    assert "check --api for a typo" in result.stderr, result.stderr


def test_an_unreachable_default_api_names_both_the_option_and_the_variable(
    monkeypatch: pytest.MonkeyPatch,
):
    from archtree_cli.main import build_parser
    from archtree_cli.service_commands import api_client

    monkeypatch.delenv("ARCHTREE_API_URL", raising=False)
    args = build_parser().parse_args(["jobs"])
    args.api = f"http://127.0.0.1:{free_port()}"  # nothing there, unlike the default maybe
    with pytest.raises(ArchtreeError) as refused, api_client(args) as client:
        client.jobs()
    assert "or check --api (or ARCHTREE_API_URL)" in str(refused.value)


@pytest.mark.parametrize("command", COMMANDS)
def test_https_to_a_plain_http_api_says_it_may_speak_http(
    command: str, html_api: str, home: Path, tmp_path: Path
):
    https = html_api.replace("http:", "https:")

    result = archtree(*command_args(command, tmp_path), "--api", https, home=home)

    line = one_error_line(result, f"cannot speak https with the server at {https}", html_api)
    assert "archtree up`, or check" not in line  # not "start it"
    assert list(tmp_path.iterdir()) == []


def test_a_port_out_of_range_is_named_as_such(home: Path):
    result = archtree("jobs", "--api", "http://127.0.0.1:99999", home=home)

    one_error_line(result, "--api 'http://127.0.0.1:99999' has port 99999, out of range", "65535")


@pytest.mark.parametrize("command", COMMANDS)
def test_an_api_address_ending_in_v1_is_told_to_drop_it(
    command: str, result_api: str, home: Path, tmp_path: Path
):
    result = archtree(*command_args(command, tmp_path), "--api", f"{result_api}/v1/", home=home)

    one_error_line(result, f"give --api without its /v1 at the end: {result_api}")


def test_fetch_refuses_an_empty_out_and_writes_nothing(result_api: str, home: Path):
    before = sorted(ROOT.iterdir())

    fetched = archtree("fetch", JOB, "--api", f"{result_api}/good", "--out", "", home=home)

    assert fetched.returncode == 2, fetched.stdout
    assert fetched.stderr.count("\n") == 1 and "--out is empty: give a path" in fetched.stderr
    assert sorted(ROOT.iterdir()) == before  # the command's own folder


ENDED_SPEC = {
    "model": "builtin:resnet",
    "data": "artifact:jobs/4f1c2a9be07d/inputs/data.npz",
    "weights": "artifact:jobs/4f1c2a9be07d/inputs/weights.safetensors",
    "upload_names": {"data": "my digits.npz", "weights": "resnet.safetensors"},
    "budget": "8ms",
    "device_class": "jetson",
    "batch_size": 4,
    "dtype": "float16",
    "num_classes": 12,
    "allow_pickle": False,
    "search": {"width": 2, "move_kinds": ["focused", "uniform"], "margin": 0.025, "seed": 3},
}
RACED = "b6d4e8f0a2c4"  # a job that ends between its read and its cancel


class EndedJobs(BaseHTTPRequestHandler):
    """Job JOB has failed; RACED reads running once, then failed, its cancel answered 409."""

    reads: dict[str, int] = {}

    def do_GET(self) -> None:
        job_id = self.path.split("/")[3]
        reads = type(self).reads
        reads[job_id] = reads.get(job_id, 0) + 1
        status = "running" if job_id == RACED and reads[job_id] == 1 else "failed"
        job = job_record(job_id, status) | {"spec": ENDED_SPEC, "cancel_requested": False}
        send_job(self, 200, job)

    def do_POST(self) -> None:
        detail = "job has already ended (failed): there is nothing to cancel; submit its spec "
        send_job(self, 409, {"detail": detail + "again with POST /v1/jobs"})

    def log_message(self, *_: object) -> None:
        pass


@pytest.mark.parametrize("job_id", [JOB, RACED])
def test_cancelling_an_ended_job_gives_the_submit_that_runs_it_again(home: Path, job_id: str):
    from archtree_cli.main import build_parser
    from archtree_cli.service_commands import submitted_spec

    with serving(EndedJobs) as api:
        cancelled = archtree("cancel", job_id, "--api", api, home=home)

    said = one_error_line(cancelled, f"job {job_id} has already ended (failed)")
    assert f"`archtree delete {job_id} --api {api}` deletes it" in said
    command = said.split("this submits it again: ", 1)[1]
    words = shlex.split(command)
    assert words[:2] == ["archtree", "submit"]
    # The command, parsed as `archtree submit` parses it, sends the same job.
    args = build_parser().parse_args(words[1:])
    assert args.api == api
    assert (args.data, args.weights) == ("my digits.npz", "resnet.safetensors")
    resent = submitted_spec(args)
    kept = ("model", "budget", "device_class", "batch_size", "dtype", "num_classes", "search")
    assert {name: resent[name] for name in kept} == {name: ENDED_SPEC[name] for name in kept}


def test_a_job_id_copied_with_spaces_around_it_is_the_job(home: Path):
    with serving(RunningJobs) as api:
        shown = archtree("status", f" {ASKED}\n", "--api", api, home=home)
        cancelled = archtree("cancel", f"{JOB} ", "--api", api, home=home)
        with ArchtreeClient(api) as client:
            job = client.job(f"\t{JOB} ")

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"job {ASKED} running"), shown.stdout
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(f"job {JOB} running"), cancelled.stdout
    assert job["id"] == JOB


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        ({"model": "builtin:vgg", "data": "builtin:digits"}, "builtin:vgg on builtin:digits"),
        (
            {
                "model": "builtin:vgg",
                "weights": "artifact:jobs/0123456789ab/inputs/weights.pt",
                "data": "artifact:jobs/0123456789ab/inputs/data.npz",
                "upload_names": {"weights": "vgg.pt", "data": "my digits.npz"},
            },
            "builtin:vgg with weights vgg.pt (uploaded) on my digits.npz (uploaded)",
        ),
        # Uploads sent without file names: said to be uploads, not by the store's paths.
        (
            {
                "model": "builtin:vgg",
                "weights": "artifact:jobs/0123456789ab/inputs/weights.pt",
                "data": "artifact:jobs/0123456789ab/inputs/data.npz",
            },
            "builtin:vgg with uploaded weights on uploaded data",
        ),
    ],
)
def test_a_job_is_shown_by_what_it_prunes_as_the_user_sent_it(spec, shown):
    assert pruned_text(spec) == shown


def test_arguments_of_the_wrong_kind_are_refused_before_anything_is_sent(tmp_path: Path):
    """ArchtreeClient called from Python: a wrong type or value is a TypeError or ValueError
    that names the argument, and nothing reaches the API."""
    asked: list[str] = []

    def answer(path: str) -> Answer:
        asked.append(path)
        jobs = {"jobs": [], "total": 0, "offset": 0, "limit": 20}
        return 200, "application/json", json.dumps(jobs).encode()

    with pytest.raises(TypeError, match="the API URL must be a str"):
        ArchtreeClient(8000)  # type: ignore[arg-type]
    with serving(answering(answer)) as api:
        for timeout_s, kind in (("5", TypeError), (0, ValueError), (float("inf"), ValueError)):
            with pytest.raises(kind, match="timeout_s must be a number of seconds"):
                ArchtreeClient(api, timeout_s=timeout_s)  # type: ignore[arg-type]
        with ArchtreeClient(api, timeout_s=5) as client:
            for call in (client.job, client.cancel, client.tree, client.delete):
                with pytest.raises(TypeError, match="a job id is a str"):
                    call(123)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="after must be an event id"):
                next(client.events(JOB, after=5))  # type: ignore[arg-type]
            for key, kind in (("a\nb", ValueError), ("é", ValueError), (5, TypeError)):
                with pytest.raises(kind, match="key must be"):
                    client.submit({"model": "builtin:vgg"}, key=key)  # type: ignore[arg-type]
            (tmp_path / "taken").write_text("mine")
            with pytest.raises(ArchtreeError, match="is a file, not a folder"):
                client.fetch(JOB, tmp_path / "taken")
            assert (tmp_path / "taken").read_text() == "mine"
            assert asked == []
            # One status given as a string is that status.
            client.jobs(statuses="succeeded")
    assert asked == ["/v1/jobs?offset=0&limit=20&status=succeeded"]


def test_events_from_a_server_that_is_not_http_are_refused_at_once(redis_url: str):
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    retries: list[str] = []

    with (
        ArchtreeClient(f"http://127.0.0.1:{port}", timeout_s=5) as client,
        pytest.raises(ArchtreeError) as raised,
    ):
        list(client.events(JOB, on_retry=retries.append))

    assert "did not answer in HTTP" in str(raised.value), raised.value
    assert retries == []
