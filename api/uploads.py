"""A submission's multipart body, read with its uploads counted while they stream in.

Content-Length is only a first check: a client may omit it or lie, so every upload's bytes are
counted as they arrive and the body is refused as soon as one exceeds its limit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from archtree_cli.settings import ServiceSettings

SPEC_FIELD = "spec"
MAX_SPEC_BYTES = 64 * 1024
# Multipart boundaries and part headers, on top of the uploads themselves.
ENVELOPE_BYTES = 64 * 1024
# Once a limit is exceeded, up to this much of the rest is read and dropped, so that a client
# still sending gets the 413 answer instead of a connection reset.
DRAIN_BYTES = 64 * 1024 * 1024


@dataclass
class Submission:
    """The `spec` field's text and the uploaded files by field name (weights, data)."""

    spec: str
    files: dict[str, UploadFile] = field(default_factory=dict)

    async def close(self) -> None:
        for upload in self.files.values():
            await upload.close()


class UploadTooLarge(Exception):
    """An upload exceeded its limit."""


def upload_limits(settings: ServiceSettings) -> dict[str, int]:
    """Largest accepted upload per file field."""
    return {"weights": settings.max_weights_bytes, "data": settings.max_data_bytes}


def too_large(name: str, limit: int) -> HTTPException:
    setting = f"ARCHTREE_MAX_{name.upper()}_BYTES"
    return HTTPException(
        status_code=413,
        detail=f"the {name} upload exceeds the limit of {limit} bytes ({limit / 2**20:.1f} MiB); "
        f"send a smaller file, or ask the operator to raise {setting}",
    )


class _LimitedParser(MultiPartParser):
    """Starlette's parser, counting each upload's bytes and dropping them past its limit."""

    def __init__(self, request: Request, stream: AsyncIterator[bytes], limits: dict[str, int]):
        super().__init__(
            request.headers,
            stream,  # type: ignore[arg-type]
            max_files=len(limits),
            max_fields=1,
            max_part_size=MAX_SPEC_BYTES,
        )
        self.limits = limits
        self.received: dict[str, int] = {}
        self.exceeded: str | None = None
        self.seen: set[str] = set()

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        part = self._current_part
        if part.field_name in self.seen:
            raise MultiPartException(f"the form field {part.field_name!r} is given twice")
        self.seen.add(part.field_name)
        if part.file is None and part.field_name != SPEC_FIELD:
            raise MultiPartException(f"unexpected form field {part.field_name!r}: send `spec`")
        if part.file is not None and part.field_name not in self.limits:
            expected = " or ".join(f"`{name}`" for name in self.limits)
            raise MultiPartException(
                f"unexpected upload {part.field_name!r}: upload files as {expected}"
            )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is not None:
            name = part.field_name
            self.received[name] = self.received.get(name, 0) + end - start
            if self.received[name] > self.limits[name] and self.exceeded is None:
                self.exceeded = name
            if self.exceeded is not None:
                return
        super().on_part_data(data, start, end)


async def read_submission(request: Request, settings: ServiceSettings) -> Submission:
    """The submission in `request`; 413 when an upload is too large, 422 when malformed."""
    limits = upload_limits(settings)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/x-www-form-urlencoded"):  # a spec, no uploads
        form = await request.form(max_files=0, max_fields=1, max_part_size=MAX_SPEC_BYTES)
        return _checked(Submission(spec=str(form.get(SPEC_FIELD) or "")))
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(
            status_code=422,
            detail="send the job as multipart/form-data: a `spec` field (JSON) and optional "
            "`weights` and `data` files",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > sum(limits.values()) + MAX_SPEC_BYTES + DRAIN_BYTES:
        name = max(limits, key=lambda n: limits[n])
        raise too_large(name, limits[name])

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
        raise too_large(str(error), limits[str(error)]) from None
    except MultiPartException as error:
        raise HTTPException(status_code=422, detail=str(error)) from None
    files = {name: value for name, value in form.multi_items() if isinstance(value, UploadFile)}
    submission = Submission(spec=str(form.get(SPEC_FIELD) or ""), files=files)
    if parser.exceeded is not None:
        await submission.close()
        raise too_large(parser.exceeded, limits[parser.exceeded])
    if not submission.spec:
        await submission.close()
    return _checked(submission)


def _checked(submission: Submission) -> Submission:
    if not submission.spec:
        raise HTTPException(status_code=422, detail="the form has no `spec` field (job JSON)")
    return submission
