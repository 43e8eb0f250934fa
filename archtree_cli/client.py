"""A small Python client of the Archtree API.

    client = ArchtreeClient("http://127.0.0.1:8000")
    job = client.submit({"model": "builtin:vgg", "data": "builtin:digits", "budget": "60%"})
    for event_id, event in client.events(job["id"]):
        print(event["kind"])
    client.fetch(job["id"], "pruned/")

Every failure is an ArchtreeError with a one-line message: the API's own message for what it
refuses (4xx), and a message naming the URL for a server that is not an Archtree API, one that
cannot be reached or does not answer in time (ARCHTREE_API_TIMEOUT_S), and a malformed URL.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from archtree_cli.environment import seconds_from_environment
from search.data_names import missing_data_file
from search.errors import ArchtreeError
from search.result_files import ARTIFACT_NAMES, check_result_places

# What `fetch` checks the JSON artifacts hold before it moves any into place.
ARTIFACT_KEYS = {
    "arch.json": ("model", "input_shape", "layers"),
    "report.json": ("budget_ms", "inputs", "baseline", "final", "search"),
}
EXAMPLE_API_URL = "http://127.0.0.1:8000"
API_TIMEOUT_VARIABLE = "ARCHTREE_API_TIMEOUT_S"
# Above the 15 s between the keep-alive pings of the API's event stream, so that a job that
# is quiet for a while is not taken for an API that stalled.
DEFAULT_API_TIMEOUT_S = 30.0
# Consecutive failed attempts to resume an event stream before giving up: with the delays
# below, about 45 s of an API that is down, enough for one to restart. A stream that sent
# anything (an event or a keep-alive ping) before it failed starts the count again.
EVENT_RECONNECTS = 8
# The wait before resuming an event stream that was refused or broke off doubles from this,
# up to the longest, to ride out an API that restarts (a stalled one has waited a timeout).
RECONNECT_DELAY_S = 1.0
LONGEST_RECONNECT_DELAY_S = 8.0
# A job's statuses once it has ended (workers.job_store.FINAL_STATUSES; not imported, as
# this client needs neither redis nor the workers).
ENDED = ("succeeded", "failed", "cancelled")
# How many times in all a submission is sent where its job may exist without its answer
# having arrived, and the statuses that ask for it again: the API still checking the same
# submission (409), a proxy that lost the API (502, 504), the API without its Redis (503).
SUBMIT_ATTEMPTS = 4
SEND_AGAIN_ON = (409, 502, 503, 504)
# Seconds to wait for the answer to the GET that tells a broken-off API from another protocol.
HTTP_PROBE_TIMEOUT_S = 5.0
# The longest Idempotency-Key the API takes (it checks keys with `is_idempotency_key`).
MAX_IDEMPOTENCY_KEY_CHARS = 200
# The start of a plain-text error body that a message quotes.
QUOTED_BODY_CHARS = 80
# How the API's answer to a path it has no route for begins (api.error_handlers).
NOTHING_AT = "nothing at "


def is_idempotency_key(key: str) -> bool:
    """Whether the API takes `key` as an Idempotency-Key: 1 to MAX_IDEMPOTENCY_KEY_CHARS
    printable ASCII characters."""
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS and key.isascii() and key.isprintable()


def shown_key(key: str) -> str:
    """`key` quoted for a message, its first 40 characters at most."""
    return f"{key[:40]!r}{'...' if len(key) > 40 else ''}"


def api_timeout_s() -> float:
    """Seconds to wait for the API to accept a connection, to answer, or to send the next part
    of an answer: $ARCHTREE_API_TIMEOUT_S, else DEFAULT_API_TIMEOUT_S (30)."""
    return seconds_from_environment(API_TIMEOUT_VARIABLE, DEFAULT_API_TIMEOUT_S, zero_allowed=False)


def checked_timeout_s(timeout_s: float) -> float:
    """`timeout_s` once it is a number of seconds above 0 (None, for no limit, is refused: a
    client that waits forever on an API that stopped answering hangs its caller)."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float):
        raise TypeError(f"timeout_s must be a number of seconds, not {timeout_s!r}")
    if not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a number of seconds above 0, not {timeout_s!r}")
    return float(timeout_s)


def checked_key(key: str) -> str:
    """`key` once the API takes it as an Idempotency-Key."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, not {key!r}")
    if not is_idempotency_key(key):
        raise ValueError(
            f"key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable ASCII characters, not "
            f"{shown_key(key)}"
        )
    return key


def without_v1(api_url: str, source: str) -> str | None:
    """What to give instead of `api_url` when it ends in /v1, which a 404 there means: the
    routes are under /v1 already (/v1/v1/jobs is nothing). None for another address."""
    if not api_url.endswith("/v1"):
        return None
    return f"give {source} without its /v1 at the end: {api_url.removesuffix('/v1')}"


def without_path(api_url: str, source: str, asked: str) -> str | None:
    """What to say when the API answered that nothing is at `asked`, a path under `api_url`'s
    own path: the API's routes are at the root of its address (an API behind a proxy that
    serves it under a path sees them there). None for an address without a path."""
    url = httpx.URL(api_url)
    if url.path in ("", "/"):
        return None
    root = f"{url.scheme}://{url.netloc.decode()}"
    return (
        f"no Archtree API at {api_url} (nothing at {asked}): give {source} the API's root "
        f"address, such as {root}"
    )


def plain_http_instead(error: Exception, api_url: str) -> str | None:
    """The http:// address to try when `error` is https failing at `api_url`: a TLS
    handshake with a server that may speak plain HTTP (waiting will not change it)."""
    if (
        api_url.startswith("https:")
        and isinstance(error, httpx.ConnectError)
        and "SSL" in str(error)
    ):
        return "http:" + api_url.removeprefix("https:")
    return None


def checked_api_url(api_url: str, source: str = "the API URL") -> str:
    """`api_url` without a trailing slash, once it is an http(s) URL with a host; `source`:
    where it came from, which a refusal names."""
    if not isinstance(api_url, str):
        raise TypeError(f"the API URL must be a str like {EXAMPLE_API_URL}, not {api_url!r}")
    try:
        url = httpx.URL(api_url.strip())
        well_formed = url.scheme in ("http", "https") and bool(url.host)
    except (httpx.InvalidURL, ValueError):
        well_formed = False
    if well_formed and url.port is not None and not 0 < url.port < 65536:
        raise ArchtreeError(
            f"{source} {api_url!r} has port {url.port}, out of range: give a port from 1 to "
            f"65535, like {EXAMPLE_API_URL}"
        )
    if not well_formed:
        raise ArchtreeError(
            f"{source} must be an http:// or https:// URL like {EXAMPLE_API_URL}, not {api_url!r}"
        )
    given = api_url.strip()
    extras = [what for mark, what in (("?", "a query"), ("#", "a fragment")) if mark in given]
    if extras:
        bare = str(url.copy_with(query=None, fragment=None)).rstrip("/")
        raise ArchtreeError(
            f"{source} {api_url!r} has {' and '.join(extras)}, which no API address has: give "
            f"{bare}"
        )
    return given.rstrip("/")


class ArchtreeClient:
    """Calls to one Archtree API; every method raises ArchtreeError with a one-line message."""

    def __init__(
        self, api_url: str, timeout_s: float | None = None, source: str = "the API URL"
    ) -> None:
        """`source`: where `api_url` came from, which messages tell the user to check (the
        command line gives its option, --api, or an environment variable)."""
        self.source = source
        self.api_url = checked_api_url(api_url, source)
        self.timeout_s = api_timeout_s() if timeout_s is None else checked_timeout_s(timeout_s)
        self.http = httpx.Client(base_url=self.api_url, timeout=self.timeout_s)

    def __enter__(self) -> ArchtreeClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def submit(
        self,
        spec: dict[str, Any],
        weights: str | Path | None = None,
        data: str | Path | None = None,
        on_retry: Callable[[str], None] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Submit a job (`spec` as in JobSpecIn), uploading local weights and data files.

        Returns the answer: `id`, `status`, `links`, and `replayed`: true when the key named
        a job created before the send answered (by an earlier submission with the key, or by a
        send of this call whose answer was lost), which the answer is; and `sends`, how many
        times this call sent the job (above 1, a replay may be of its own first send). The
        submission carries an Idempotency-Key, `key` or a new random one, so it is sent again, up to
        SUBMIT_ATTEMPTS times in all, where the job may have been created without its answer
        arriving (the connection broke off after it was sent, no answer came in time, a proxy
        answered 502-504, the API 503) or the API is still checking it (409): the service
        creates one job whatever the number of sends. `on_retry` gets a line each time. Where
        the last send fails so, the error is a MaybeSubmitted carrying the key: a submission
        with the same key within a day gets the job, if it was created, rather than a second.
        """
        key = uuid.uuid4().hex if key is None else checked_key(key)
        for attempt in range(1, SUBMIT_ATTEMPTS + 1):
            with ExitStack() as files:
                uploads = {}
                for name, path in (("weights", weights), ("data", data)):
                    if path is not None:
                        uploads[name] = (Path(path).name, files.enter_context(_open(path, name)))
                try:
                    answer = self.http.request(
                        "POST",
                        "/v1/jobs",
                        data={"spec": json.dumps(spec)},
                        files=uploads or None,
                        headers={"Idempotency-Key": key},
                    )
                except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                    raise self._failure(error) from None  # nothing was sent
                except httpx.TransportError as error:
                    broken_off = not isinstance(error, httpx.TimeoutException)
                    if broken_off and not self._speaks_http():
                        raise self._not_http(error) from None  # no API: no job was created
                    if attempt == SUBMIT_ATTEMPTS:
                        raise MaybeSubmitted(str(self._failure(error)), key) from None
                    what, delay_s = self._stall(error), None
                else:
                    if answer.status_code not in SEND_AGAIN_ON:
                        created = self._with_keys(self._decoded(answer), ("id", "status"))
                        return {**created, "sends": attempt}
                    if attempt == SUBMIT_ATTEMPTS:
                        try:
                            self._decoded(answer)
                        except ArchtreeError as error:
                            raise MaybeSubmitted(str(error), key) from None
                    what = f"answered HTTP {answer.status_code}"
                    delay_s = _retry_after_s(answer) if "retry-after" in answer.headers else None
            if on_retry is not None:
                on_retry(
                    f"the API at {self.api_url} {what}; sending the job again ({attempt} of "
                    f"{SUBMIT_ATTEMPTS - 1}): the service creates it once however often it is sent"
                )
            _pause_before_retry(attempt, delay_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's status, progress and spec."""
        answer = self._json("GET", _job_path(job_id))
        return self._with_keys(answer, ("id", "status", "spec", "progress"))

    def jobs(
        self, offset: int = 0, limit: int = 20, statuses: Sequence[str] = ()
    ) -> dict[str, Any]:
        """A page of jobs, newest first (only those in `statuses`, when given): `jobs`,
        `total`, `offset`, `limit`."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if statuses:
            # One status given as a string is that status, not its letters.
            params["status"] = [statuses] if isinstance(statuses, str) else list(statuses)
        return self._json("GET", "/v1/jobs", params=params)

    def tree(self, job_id: str) -> dict[str, Any]:
        """The job's search tree so far."""
        return self._json("GET", _job_path(job_id, "tree"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop; returns the job."""
        return self._json("POST", _job_path(job_id, "cancel"))

    def delete(self, job_id: str) -> None:
        """Delete an ended job and its files (ArchtreeError for one still running)."""
        self._json("DELETE", _job_path(job_id))

    def readiness(self) -> dict[str, Any]:
        """GET /readyz: `status`, the Celery `workers` that answered, `agents_online` per
        device class and, when something is missing, a `detail` that says what."""
        return self._with_keys(self._json("GET", "/readyz"), ("status", "workers"))

    def devices(self) -> dict[str, Any]:
        """Registered devices (`devices`) and the queue depth per device class."""
        return self._json("GET", "/v1/devices")

    def events(
        self,
        job_id: str,
        after: str | None = None,
        on_retry: Callable[[str], None] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's events (id, event) from the start or after `after`, live, until it ends.

        A stream that stalls or breaks off is resumed where it stopped (Last-Event-ID), up to
        EVENT_RECONNECTS times in a row (a stream that sent anything ends the row); `on_retry`
        gets a line saying so each time. An API that refuses the very first connection is
        reported at once, and a job deleted meanwhile (by another client, once it had ended) is
        a JobDeleted.
        """
        path = _job_path(job_id, "events")
        if after is not None and not isinstance(after, str):
            raise TypeError(f"after must be an event id (a str) from events, not {after!r}")
        answered = False
        failures = 0
        stream = f"the events of job {job_id} at {self.api_url}"
        heard = False
        last_status: str | None = None

        def hearing(lines: Iterator[str]) -> Iterator[str]:
            nonlocal heard
            for line in lines:
                heard = True
                yield line

        while True:
            headers = {"Last-Event-ID": after} if after else {}
            heard = False
            # On a failure worth retrying: the error to give up with, the line saying what
            # happened, and the wait before retrying (None: doubling from RECONNECT_DELAY_S).
            give_up: ArchtreeError
            delay_s: float | None = None
            try:
                with self._stream("GET", path, headers=headers) as answer:
                    if _media_type(answer) != "text/event-stream":
                        raise self._not_archtree(f"got {_media_type(answer)} for the events")
                    answered = True
                    ended = False
                    for event_id, event in _server_sent_events(hearing(answer.iter_lines())):
                        if not isinstance(event, dict):
                            raise self._not_archtree("an event is not a JSON object")
                        after = event_id
                        if event.get("kind") == "status" and isinstance(event.get("status"), str):
                            last_status = event["status"]
                        ended = last_status in ENDED
                        yield event_id, event
                if ended:
                    return
                # A stream that stops before the job's final status broke off, and is resumed,
                # unless its job was deleted (an ended job, whose events went with it).
                self._check_still_there(job_id)
                give_up = ArchtreeError(
                    f"the event stream of job {job_id} at {self.api_url} keeps ending before "
                    "the job does; check the service's log"
                )
                what = f"{stream} stopped before the job ended"
            except Unavailable as error:
                give_up, what, delay_s = error, str(error), error.retry_after_s
            except NotFound:
                if answered:  # the job was there when its events were first asked for
                    raise JobDeleted(job_id, before_its_end=True, last_status=last_status) from None
                raise  # no such job
            except ValueError:
                raise self._not_archtree("the events are not JSON") from None
            except httpx.RequestError as error:
                refused = isinstance(error, httpx.ConnectError)
                if (refused and not answered) or not isinstance(error, httpx.TransportError):
                    raise self._failure(error) from None
                # Nothing has answered yet, and what broke off speaks another protocol (a
                # Redis): no API is there to resume, said at once as the other calls say it.
                # A stall is retried: an API restarting, or too busy to answer in time.
                stalled = isinstance(error, httpx.TimeoutException)
                if not answered and not stalled and not self._speaks_http():
                    raise self._not_http(error) from None
                give_up = self._stream_failure(job_id, error, answered)
                what = f"{stream} {self._stall(error)}"
                if isinstance(error, httpx.TimeoutException):
                    delay_s = 0.0  # a stalled stream has waited a timeout already
            # An API that served this stream for a while is not the one that keeps failing.
            failures = 1 if heard else failures + 1
            if failures > EVENT_RECONNECTS:
                raise give_up from None
            if on_retry is not None:
                on_retry(f"{what}; retrying ({failures} of {EVENT_RECONNECTS})")
            _pause_before_retry(failures, delay_s)

    def ended_job(
        self, job_id: str, on_retry: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        """The job, once `events` said it ended: asked again while the API cannot be reached
        or answers 503 (it may be restarting just as the job ended), up to EVENT_RECONNECTS
        times in a row, as `events` resumes its stream; `on_retry` gets a line each time.
        JobDeleted when it was deleted since."""
        failures = 0
        while True:
            try:
                return self.job(job_id)
            except NotFound:
                raise JobDeleted(job_id) from None
            except (Unreachable, Unavailable) as error:
                failures += 1
                if failures >= EVENT_RECONNECTS:
                    raise
                if on_retry is not None:
                    on_retry(f"{error}; retrying ({failures} of {EVENT_RECONNECTS})")
                _pause_before_retry(failures, getattr(error, "retry_after_s", None))

    def _check_still_there(self, job_id: str) -> None:
        """NotFound when the job is no longer there; any other failure is left for its
        resumed event stream to say."""
        try:
            self.job(job_id)
        except NotFound:
            raise
        except ArchtreeError:
            pass

    def fetch(self, job_id: str, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
        """Write the job's arch.json, model.safetensors and report.json into `out_dir`.

        All three are downloaded into a temporary folder beside them and checked first, then
        moved in; a result already there is replaced only with `overwrite`, and a folder where
        a result file goes is refused. On any failure `out_dir` is left as it was.
        """
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ArchtreeError(f"{out} is a file, not a folder: choose another out_dir")
        _check_destinations(out, overwrite)  # again before the move: it may change meanwhile
        staging = _staging_folder(out)
        try:
            for name in ARTIFACT_NAMES:
                self._download(_job_path(job_id, "artifacts", name), staging / name)
                problem = _artifact_problem(staging / name)
                if problem:
                    raise self._not_archtree(problem, sent="result")
            return _move_into(staging, out, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, path: str, target: Path) -> None:
        name = target.name
        try:
            with self._stream("GET", path) as answer, target.open("wb") as handle:
                media = _media_type(answer)
                if not _fits_artifact(name, media):
                    raise self._not_archtree(f"got {media} for {name}", sent="result")
                for chunk in answer.iter_bytes():
                    handle.write(chunk)
        except httpx.RequestError as error:
            raise self._failure(error) from None
        except OSError as error:
            raise ArchtreeError(f"cannot write {target}: {error.strerror}") from None

    def _json(self, method: str, path: str, **options: Any) -> Any:
        try:
            answer = self.http.request(method, path, **options)
        except httpx.RequestError as error:
            raise self._failure(error) from None
        return self._decoded(answer)

    def _decoded(self, answer: httpx.Response) -> Any:
        """The answer's JSON (None when empty), once its status is a success."""
        self._raise_for_status(answer)
        if not answer.content:
            return None
        if not _is_json(_media_type(answer)):
            raise self._not_archtree(f"got {_media_type(answer)}")
        try:
            return answer.json()
        except ValueError:
            raise self._not_archtree("its JSON does not parse") from None

    def _with_keys(self, answer: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(answer, dict) or any(key not in answer for key in keys):
            raise self._not_archtree(f"expected a JSON object with {', '.join(keys)}")
        return answer

    @contextmanager
    def _stream(self, method: str, path: str, **options: Any) -> Iterator[httpx.Response]:
        """A streamed answer, once its status is a success; httpx's errors pass through."""
        with self.http.stream(method, path, **options) as answer:
            if answer.status_code >= 300:
                answer.read()
                self._raise_for_status(answer)
            yield answer

    def _raise_for_status(self, answer: httpx.Response) -> None:
        """ArchtreeError for an answer that is no success: the API's own `detail` where the
        body is the API's JSON error, else what the server sent."""
        status = answer.status_code
        if status < 300:
            return
        if status < 400:
            where = answer.headers.get("location", "elsewhere")
            raise ArchtreeError(
                f"the server at {self.api_url} redirects to {where} (HTTP {status}): check "
                f"{self.source}, an Archtree API answers directly"
            )
        detail = _json_detail(answer)
        if detail is None:
            sent = f"HTTP {status}, {_media_type(answer)}{_quoted_text(answer)}"
            raise self._not_archtree(sent, also=", or the service's log" if status >= 500 else "")
        fix = without_v1(self.api_url, self.source) if status == 404 else None
        if fix:
            raise ArchtreeError(f"{detail}; {fix}")
        if status == 404 and detail.startswith(NOTHING_AT):
            wrong = without_path(self.api_url, self.source, answer.request.url.path)
            if wrong:
                raise ArchtreeError(wrong)
        if status == 404:
            raise NotFound(detail)
        if status < 500:
            raise ArchtreeError(detail)
        message = f"the API at {self.api_url} failed (HTTP {status}: {detail})"
        if status == 503:
            raise Unavailable(message, _retry_after_s(answer))
        raise ArchtreeError(message)

    def _failure(self, error: httpx.RequestError) -> ArchtreeError:
        """What an httpx error means to the user."""
        if isinstance(error, httpx.TimeoutException):
            return ArchtreeError(
                f"the API at {self.api_url} did not answer within {self.timeout_s:g} s; check "
                f"{self.source}, and that the service is running ({API_TIMEOUT_VARIABLE} sets "
                "the wait)"
            )
        plain = plain_http_instead(error, self.api_url)
        if plain is not None:
            return ArchtreeError(
                f"cannot speak https with the server at {self.api_url} ({error}): it may speak "
                f"plain http, as an API started by `archtree up` or `archtree api` does; give "
                f"{plain}, or check {self.source}"
            )
        unresolved = _unresolved_host(error)
        if unresolved is not None:
            return Unreachable(
                f"cannot reach the API at {self.api_url}: the host name {unresolved!r} does not "
                f"resolve ({_cause(error, socket.gaierror)}); check {self.source} for a typo, "
                "or this machine's DNS"
            )
        if isinstance(error, httpx.RemoteProtocolError):
            return self._not_http(error)
        v1 = without_v1(self.api_url, self.source)
        also = f" ({v1})" if v1 else ""
        if isinstance(error, httpx.TransportError):
            return Unreachable(
                f"cannot reach the API at {self.api_url} ({type(error).__name__}): start it "
                f"with `archtree up`, or check {self.source}{also}"
            )
        return self._not_archtree(type(error).__name__)

    def _not_http(self, error: httpx.TransportError) -> Unreachable:
        """Reached, but what came back was not HTTP, or nothing: another kind of server
        (Redis, a database), or an API that stopped mid-answer."""
        v1 = without_v1(self.api_url, self.source)
        also = f" ({v1})" if v1 else ""
        return Unreachable(
            f"the server at {self.api_url} did not answer in HTTP ({error or type(error).__name__}"
            f"): check that {self.source} names an Archtree API (the address `archtree up` "
            f"prints), and that it is running{also}"
        )

    def _stream_failure(
        self, job_id: str, error: httpx.TransportError, answered: bool
    ) -> ArchtreeError:
        if answered and isinstance(error, (httpx.ReadError, httpx.RemoteProtocolError)):
            return ArchtreeError(
                f"the event stream of job {job_id} at {self.api_url} keeps breaking off "
                f"({type(error).__name__}); check that the service is running"
            )
        return self._failure(error)

    def _speaks_http(self) -> bool:
        """Whether the server answers a GET /healthz in HTTP, whatever it says: a submission
        it broke off is worth sending again only then (an API that failed mid-answer), not to
        a server of another protocol (a Redis) that can have created no job."""
        try:
            self.http.get("/healthz", timeout=min(self.timeout_s, HTTP_PROBE_TIMEOUT_S))
        except (httpx.RemoteProtocolError, httpx.ReadError):
            # Not HTTP back, or the connection reset by a server that read the request as
            # something else (Redis closes on an HTTP header line).
            return False
        except httpx.TransportError:
            return True  # no telling: sent again, as before
        return True

    def _stall(self, error: httpx.TransportError) -> str:
        if isinstance(error, httpx.TimeoutException):
            return f"sent nothing for {self.timeout_s:g} s"
        if isinstance(error, httpx.ConnectError):
            return "cannot be reached"
        return f"broke off ({type(error).__name__})"

    def _not_archtree(self, what: str, sent: str = "answer", also: str = "") -> ArchtreeError:
        return ArchtreeError(
            f"the server at {self.api_url} did not send an Archtree {sent} ({what}): check "
            f"{self.source}{also}"
        )


class MaybeSubmitted(ArchtreeError):
    """A submission whose job the service may have created, though no answer said so: sent
    again with the same Idempotency-Key (`key`) within a day, it gets that job, if any."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class NotFound(ArchtreeError):
    """The API answered 404: no such job or device, or a job's result file it does not have
    (yet)."""


class JobDeleted(NotFound):
    """The job whose events were followed is no longer there: deleted meanwhile (once it had
    ended), or, when it was last seen before its end (`last_status`), possibly lost with the
    service's Redis (restarted without persistence, or flushed), which no client can tell
    apart from a deletion whose final status it missed (`before_its_end`)."""

    def __init__(
        self, job_id: str, before_its_end: bool = False, last_status: str | None = None
    ) -> None:
        if not before_its_end:
            what = "was deleted while being watched, with its events and result files"
        else:
            seen = f", last seen {last_status}" if last_status else ""
            what = (
                f"is gone from the service{seen}: it ended and was deleted meanwhile, or the "
                "service's Redis lost it (restarted without persistence, or flushed)"
            )
        super().__init__(
            f"job {job_id} {what}: nothing of it is left to show; submit it again to run it anew"
        )
        self.job_id = job_id


class Unreachable(ArchtreeError):
    """The API could not be reached (refused, reset): it may be restarting."""


class Unavailable(ArchtreeError):
    """The API answered 503 (its Redis cannot be reached): worth asking again later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after_s(answer: httpx.Response) -> float:
    """The answer's Retry-After in seconds (RECONNECT_DELAY_S when absent or a date)."""
    try:
        return max(0.0, float(answer.headers.get("retry-after", "")))
    except ValueError:
        return RECONNECT_DELAY_S


def _job_path(job_id: str, *rest: str) -> str:
    """/v1/jobs/ID/...: the id quoted, so that no id reaches another route; spaces around it
    (copied with the id) are dropped."""
    if not isinstance(job_id, str):
        raise TypeError(f"a job id is a str, such as the `id` submit returned, not {job_id!r}")
    job_id = job_id.strip()
    if job_id.strip(".") == "" or "/" in job_id:
        raise ArchtreeError(f"{job_id!r} is not a job id: give the id `archtree submit` printed")
    return "/".join(("/v1/jobs", quote(job_id, safe=""), *rest))


def _open(path: str | Path, name: str):
    """The upload `name` (weights, data) opened, or the error `prune` gives of the file."""
    if not Path(path).exists():
        missing = f"{name} file {str(path)!r} does not exist; check the path"
        raise ArchtreeError(missing_data_file(str(path)) if name == "data" else missing)
    try:
        return Path(path).open("rb")
    except OSError as error:
        raise ArchtreeError(f"cannot read the {name} file {path}: {error.strerror}") from None


def _media_type(answer: httpx.Response) -> str:
    media = answer.headers.get("content-type", "").partition(";")[0].strip().lower()
    return media or "no content type"


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _pause_before_retry(failures: int, delay_s: float | None = None) -> None:
    """Wait before asking again after `failures` in a row: `delay_s` when the server said
    (Retry-After), else doubling from RECONNECT_DELAY_S; at most LONGEST_RECONNECT_DELAY_S."""
    if delay_s is None:
        delay_s = RECONNECT_DELAY_S * 2 ** (failures - 1)
    time.sleep(min(delay_s, LONGEST_RECONNECT_DELAY_S))


def _cause(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of `kind` among `error` and what it was raised from."""
    seen = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unresolved_host(error: httpx.RequestError) -> str | None:
    """The host name a connection failed to resolve, or None (another failure)."""
    if not isinstance(error, httpx.ConnectError) or _cause(error, socket.gaierror) is None:
        return None
    try:
        return error.request.url.host
    except RuntimeError:  # no request attached
        return None


def _fits_artifact(name: str, media: str) -> bool:
    """Whether an artifact may come as `media`: JSON files as JSON, the weights as no text."""
    if name.endswith(".json"):
        return _is_json(media)
    return not (media.startswith("text/") or _is_json(media))


def _json_detail(answer: httpx.Response) -> str | None:
    """The `detail` of an error the API answered as JSON; None for any other body."""
    try:
        body = answer.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "detail" not in body:
        return None
    detail = body["detail"]
    return detail if isinstance(detail, str) else json.dumps(detail)


def _quoted_text(answer: httpx.Response) -> str:
    """`: first line` of a plain-text body, which says what failed; nothing for markup."""
    if _media_type(answer) != "text/plain" or not answer.text.strip():
        return ""
    return ": " + answer.text.strip().splitlines()[0][:QUOTED_BODY_CHARS]


def _staging_folder(out: Path) -> Path:
    """A new temporary folder on the file system of `out`: inside it when it exists, else in
    its nearest existing parent."""
    nearest = next(folder for folder in (out, *out.parents) if folder.is_dir())
    try:
        return Path(tempfile.mkdtemp(prefix=".archtree-fetch-", dir=nearest))
    except OSError as error:
        raise ArchtreeError(f"cannot write into {nearest}: {error.strerror}") from None


def _artifact_problem(path: Path) -> str | None:
    """Why the downloaded file is not the artifact its name says, or None."""
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_bytes())
        except ValueError:
            return f"{path.name} is not JSON"
        if not isinstance(content, dict):
            return f"{path.name} is not a JSON object"
        missing = [key for key in ARTIFACT_KEYS[path.name] if key not in content]
        return f"{path.name} has no {', '.join(missing)}" if missing else None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except SafetensorError as error:
        return f"{path.name} is not a safetensors file: {error}"


def _check_destinations(out: Path, overwrite: bool) -> None:
    """ArchtreeError, before any file is moved, when a result file cannot go into `out`: a
    result is there and `overwrite` is off, or a folder is where a file goes. Said with
    `fetch`'s arguments (`archtree fetch` words them as its options: cli_terms)."""
    check_result_places(out, out_name="out_dir")
    existing = [name for name in ARTIFACT_NAMES if (out / name).exists()]
    if existing and not overwrite:
        raise ArchtreeError(
            f"{out} already holds a result ({', '.join(existing)}): choose another out_dir, "
            "or pass overwrite=True to replace it"
        )


def _move_into(staging: Path, out: Path, overwrite: bool) -> list[Path]:
    """Move the checked artifacts from `staging` into `out`, once every one can go there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        _check_destinations(out, overwrite)
        for name in ARTIFACT_NAMES:
            (staging / name).replace(out / name)
    except OSError as error:
        raise ArchtreeError(f"cannot write the result into {out}: {error.strerror}") from None
    return [out / name for name in ARTIFACT_NAMES]


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(id, decoded data) of each event in a text/event-stream; comments are skipped."""
    event_id, data = "", []
    for line in lines:
        if not line:
            if data:
                yield event_id, json.loads("\n".join(data))
            data = []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "data":
            data.append(value)
