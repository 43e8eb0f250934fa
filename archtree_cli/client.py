"""A small Python client of the Archtree API.

    client = ArchtreeClient("http://127.0.0.1:8000")
    job = client.submit({"model": "builtin:vgg", "data": "builtin:digits", "budget": "60%"})
    for event_id, event in client.events(job["id"]):
        print(event["kind"])
    client.fetch(job["id"], "pruned/")

Errors the API answers (4xx) become ArchtreeError with the API's own message.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from search.errors import ArchtreeError

# search.artifacts.ARTIFACT_NAMES, not imported: that module needs torch, this client does not.
ARTIFACT_NAMES = ("arch.json", "model.safetensors", "report.json")
# Reconnections of an event stream that broke off before the job ended.
EVENT_RECONNECTS = 5


class ArchtreeClient:
    """Calls to one Archtree API; every method raises ArchtreeError with a one-line message."""

    def __init__(self, api_url: str, timeout_s: float = 60.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.http = httpx.Client(base_url=self.api_url, timeout=timeout_s)

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
    ) -> dict[str, Any]:
        """Submit a job (`spec` as in JobSpecIn), uploading local weights and data files.

        Returns the answer: `id`, `status`, `links`.
        """
        with ExitStack() as files:
            uploads = {}
            for name, path in (("weights", weights), ("data", data)):
                if path is not None:
                    uploads[name] = (Path(path).name, files.enter_context(_open(path, name)))
            return self._json(
                "POST", "/v1/jobs", data={"spec": json.dumps(spec)}, files=uploads or None
            )

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's status, progress and spec."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def jobs(self, offset: int = 0, limit: int = 20) -> dict[str, Any]:
        """A page of jobs, newest first: `jobs`, `total`, `offset`, `limit`."""
        return self._json("GET", "/v1/jobs", params={"offset": offset, "limit": limit})

    def tree(self, job_id: str) -> dict[str, Any]:
        """The job's search tree so far."""
        return self._json("GET", f"/v1/jobs/{job_id}/tree")

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop; returns the job."""
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def devices(self) -> dict[str, Any]:
        """Registered devices (`devices`) and the queue depth per device class."""
        return self._json("GET", "/v1/devices")

    def events(self, job_id: str, after: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's events (id, event) from the start or after `after`, live, until it ends.

        A stream that breaks off is resumed where it stopped (Last-Event-ID).
        """
        reconnects = 0
        while True:
            headers = {"Last-Event-ID": after} if after else {}
            try:
                with self._stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as answer:
                    for event_id, event in _server_sent_events(answer.iter_lines()):
                        after = event_id
                        reconnects = 0
                        yield event_id, event
                return
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ReadTimeout):
                reconnects += 1
                if reconnects > EVENT_RECONNECTS:
                    raise ArchtreeError(
                        f"the event stream of job {job_id} at {self.api_url} keeps breaking off"
                    ) from None

    def fetch(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Write the job's arch.json, model.safetensors and report.json into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in ARTIFACT_NAMES:
            target = out / name
            partial = target.with_name(name + ".partial")
            url = f"/v1/jobs/{job_id}/artifacts/{name}"
            with self._stream("GET", url) as answer, partial.open("wb") as handle:
                for chunk in answer.iter_bytes():
                    handle.write(chunk)
            partial.replace(target)
            written.append(target)
        return written

    def _json(self, method: str, path: str, **options: Any) -> Any:
        try:
            answer = self.http.request(method, path, **options)
        except httpx.TransportError as error:
            raise self._unreachable(error) from None
        _raise_for_status(answer, self.api_url)
        return answer.json() if answer.content else None

    def _stream(self, method: str, path: str, **options: Any) -> _Stream:
        return _Stream(self, method, path, options)

    def _unreachable(self, error: Exception) -> ArchtreeError:
        return ArchtreeError(
            f"cannot reach the API at {self.api_url} ({type(error).__name__}): start it with "
            "`archtree up`, or check --api"
        )


class _Stream:
    """A streamed request whose errors are reported like those of the other calls."""

    def __init__(self, client: ArchtreeClient, method: str, path: str, options: dict[str, Any]):
        self.client = client
        self.context = client.http.stream(method, path, **options)

    def __enter__(self) -> httpx.Response:
        try:
            answer = self.context.__enter__()
        except httpx.ConnectError as error:
            raise self.client._unreachable(error) from None
        if answer.status_code >= 400:
            answer.read()
            self.context.__exit__(None, None, None)
            _raise_for_status(answer, self.client.api_url)
        return answer

    def __exit__(self, *exc: Any) -> None:
        self.context.__exit__(*exc)


def _open(path: str | Path, name: str):
    try:
        return Path(path).open("rb")
    except OSError as error:
        raise ArchtreeError(f"cannot read the {name} file {path}: {error.strerror}") from None


def _raise_for_status(answer: httpx.Response, api_url: str) -> None:
    if answer.status_code < 400:
        return
    try:
        detail = answer.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if not isinstance(detail, str):
        detail = (
            answer.text.strip().splitlines()[0] if answer.text.strip() else answer.reason_phrase
        )
    if answer.status_code < 500:
        raise ArchtreeError(detail)
    raise ArchtreeError(f"the API at {api_url} failed (HTTP {answer.status_code}: {detail})")


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
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
