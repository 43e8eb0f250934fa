"""A submission's multipart body, read with its uploads counted while they stream in.

Content-Length is only a first check: a client may omit it or lie, so every upload's bytes are
counted as they arrive and the body is refused as soon as one exceeds its limit.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.deps import quoted
from archtree_cli.settings import ServiceSettings

SPEC_FIELD = "spec"
MAX_SPEC_BYTES = 64 * 1024
# Multipart boundaries and part headers, on top of the parts themselves.
ENVELOPE_BYTES = 64 * 1024
# Once a limit is exceeded, up to this much of the rest is read and dropped, so that a client
# still sending gets the 413 answer instead of a connection reset.
DRAIN_BYTES = 64 * 1024 * 1024
# A url-encoded spec: each of its bytes is sent as at most 3 (%XX).
MAX_URL_ENCODED_BYTES = 3 * MAX_SPEC_BYTES + len(SPEC_FIELD) + 1
FORM_HINT = (
    "send the job as multipart/form-data: `spec` as one form field holding the job's JSON, and "
    "optional `weights` and `data` as files (curl -F 'spec=<job.json' -F weights=@model.pt "
    "-F data=@data.npz)"
)


@dataclass
class Submission:
    """The `spec` field's text (None while the form has none) and the uploaded files by
    field name (weights, data)."""

    spec: str | None
    files: dict[str, UploadFile] = field(default_factory=dict)

    async def close(self) -> None:
        for upload in self.files.values():
            await upload.close()


class UploadTooLarge(Exception):
    """A part exceeded its limit."""


def upload_limits(settings: ServiceSettings) -> dict[str, int]:
    """Largest accepted upload per file field."""
    return {"weights": settings.max_weights_bytes, "data": settings.max_data_bytes}


def too_large(name: str, limit: int) -> HTTPException:
    """413 for the part `name` over its `limit`."""
    if name == SPEC_FIELD:
        return HTTPException(
            status_code=413,
            detail=f"the spec is too large: at most {MAX_SPEC_BYTES} bytes of JSON; send a "
            "smaller spec, with weights and data as the `weights` and `data` files, not in it",
        )
    setting = f"ARCHTREE_MAX_{name.upper()}_BYTES"
    mebibytes = f" ({limit / 2**20:.1f} MiB)" if limit >= 2**20 else ""
    return HTTPException(
        status_code=413,
        detail=f"the {name} upload exceeds the limit of {limit} bytes{mebibytes}; "
        f"send a smaller file, or ask the operator to raise {setting}",
    )


def request_too_large(declared: int, limits: dict[str, int]) -> HTTPException:
    """413 for a request that declares more bytes than any submission may hold."""
    uploads = ", ".join(f"{name} up to {limit} bytes" for name, limit in limits.items())
    settings = " or ".join(f"ARCHTREE_MAX_{name.upper()}_BYTES" for name in limits)
    return HTTPException(
        status_code=413,
        detail=f"the request declares {declared} bytes, more than a submission may hold (a spec "
        f"up to {MAX_SPEC_BYTES} bytes, {uploads}); send smaller files, or ask the operator "
        f"to raise {settings}",
    )


def check_part(name: str, is_file: bool, seen: Collection[str], uploads: Collection[str]) -> None:
    """422 unless the part is the `spec` (a field or a file) or an upload file, and its name
    is new."""
    if name in seen:
        message = f"the form field {quoted(name)} is given twice: send it once"
    elif name != SPEC_FIELD and name not in uploads:
        message = f"unexpected form field {quoted(name)}: {FORM_HINT}"
    elif name != SPEC_FIELD and not is_file:
        message = f"`{name}` must be a file, not a text field (curl -F '{name}=@FILE'); {FORM_HINT}"
    else:
        return
    raise HTTPException(status_code=422, detail=message)


class _LimitedParser(MultiPartParser):
    """Starlette's parser taking `spec` and the uploads once each, counting each part's bytes
    and dropping them past its limit."""

    def __init__(self, request: Request, stream: AsyncIterator[bytes], limits: dict[str, int]):
        # check_part takes each known name once, which bounds the parts: Starlette's own
        # counts would refuse first, with messages that do not say what to send.
        super().__init__(
            request.headers,
            stream,  # type: ignore[arg-type]
            max_files=math.inf,
            max_fields=math.inf,
            max_part_size=MAX_SPEC_BYTES,
        )
        self.uploads = set(limits)
        self.limits = {SPEC_FIELD: MAX_SPEC_BYTES, **limits}
        self.received: dict[str, int] = {}
        self.exceeded: str | None = None
        self.started: list[str] = []
        self.ended: set[str] = set()
        self.undecodable: set[str] = set()

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        check_part(part.field_name, part.file is not None, self.started, self.uploads)
        self.started.append(part.field_name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        name = self._current_part.field_name
        self.received[name] = self.received.get(name, 0) + end - start
        if self.received[name] > self.limits[name] and self.exceeded is None:
            self.exceeded = name
        if self.exceeded is not None:
            return
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None and self.exceeded is None:
            # Starlette reads a text field its charset cannot decode as Latin-1, which would
            # turn a UTF-8 text in another encoding into other characters without a word.
            try:
                bytes(part.data).decode(self._charset)
            except (UnicodeDecodeError, LookupError):
                self.undecodable.add(part.field_name)
        super().on_part_end()
        self.ended.add(part.field_name)


async def read_submission(request: Request, settings: ServiceSettings) -> Submission:
    """The submission in `request`; 413 when a part is too large, 422 when malformed."""
    limits = upload_limits(settings)
    content_type = request.headers.get("content-type", "").lower()  # a media type's case
    if content_type.startswith("application/x-www-form-urlencoded"):  # a spec, no uploads
        return _checked(Submission(spec=await _url_encoded_spec(request, limits)))
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(status_code=422, detail=FORM_HINT)
    declared = request.headers.get("content-length", "")
    largest = MAX_SPEC_BYTES + sum(limits.values()) + ENVELOPE_BYTES + DRAIN_BYTES
    if declared.isdigit() and int(declared) > largest:
        raise request_too_large(int(declared), limits)

    async def body() -> AsyncIterator[bytes]:
        dropped = 0
        async for chunk in request.stream():
            if parser.exceeded is not None:
                dropped += len(chunk)
                if dropped > DRAIN_BYTES:
                    raise UploadTooLarge(parser.exceeded)
            yield chunk

    parser = _LimitedParser(request, body(), limits)
    try:
        form = await parser.parse()
    except UploadTooLarge as error:
        raise too_large(str(error), parser.limits[str(error)]) from None
    except MultiPartException as error:  # Starlette's: the body is no valid multipart form
        raise HTTPException(
            status_code=422, detail=f"{str(error).rstrip('.')}: {FORM_HINT}"
        ) from None
    files = {name: value for name, value in form.multi_items() if isinstance(value, UploadFile)}
    submission = Submission(spec=None, files=files)
    try:
        if parser.exceeded is not None:
            raise too_large(parser.exceeded, parser.limits[parser.exceeded])
        cut = [name for name in parser.started if name not in parser.ended]
        if cut:
            raise HTTPException(
                status_code=422,
                detail=f"the form ends inside its {quoted(cut[0])} part, without the closing "
                "boundary: the upload was cut off; send it again",
            )
        if SPEC_FIELD in parser.undecodable:
            raise HTTPException(
                status_code=422,
                detail=f"the `spec` field is not {parser._charset.upper()} text: send the "
                "job's JSON in UTF-8",
            )
        spec = form.get(SPEC_FIELD)
        if isinstance(spec, UploadFile):  # sent as a file: curl -F spec=@job.json
            spec = _decoded_spec(await spec.read())
            await submission.files.pop(SPEC_FIELD).close()
        submission.spec = spec
        return _checked(submission)
    except BaseException:
        await submission.close()
        raise


def _decoded_spec(raw: bytes) -> str:
    """The text of a spec sent as a file."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise HTTPException(
            status_code=422, detail="the spec file is not UTF-8 text: send the job's JSON"
        ) from None


async def _url_encoded_spec(request: Request, limits: dict[str, int]) -> str | None:
    """The `spec` of a url-encoded form (curl -d spec=...), which can hold nothing else."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_URL_ENCODED_BYTES:
            raise too_large(SPEC_FIELD, MAX_SPEC_BYTES)
    try:
        fields = parse_qsl(body.decode("utf-8"), keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HTTPException(
            status_code=422,
            detail="the `spec` field is not UTF-8 text: send the job's JSON in UTF-8, "
            "percent-encoded (curl --data-urlencode spec@job.json)",
        ) from None
    seen: list[str] = []
    for name, _ in fields:
        check_part(name, False, seen, limits)
        seen.append(name)
    spec = next((value for name, value in fields if name == SPEC_FIELD), None)
    if spec is not None and len(spec.encode()) > MAX_SPEC_BYTES:
        raise too_large(SPEC_FIELD, MAX_SPEC_BYTES)
    return spec


def _checked(submission: Submission) -> Submission:
    if submission.spec is None:
        raise HTTPException(
            status_code=422, detail=f"the form has no `spec` field (job JSON): {FORM_HINT}"
        )
    submission.spec = submission.spec.removeprefix("\ufeff")  # a byte order mark, as in a file
    if not submission.spec.strip():
        raise HTTPException(
            status_code=422,
            detail=f"the `spec` field is empty: give the job's JSON in it; {FORM_HINT}",
        )
    return submission
