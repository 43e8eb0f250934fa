"""Jobs: submit, list, follow (status, tree, events), cancel, fetch results, delete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api import submission
from api.deps import (
    JobDep,
    ServicesDep,
    header_as_sent,
    only_known_query_parameters,
    quoted,
)
from api.event_stream import job_events, start_after
from api.job_reads import read_jobs, read_lost_tasks
from api.schemas import (
    INVALID,
    UNAVAILABLE,
    ErrorMessage,
    Job,
    JobCreated,
    JobLinks,
    JobList,
    JobStatus,
    JobTree,
    as_json,
)
from api.spec_terms import in_spec_terms
from api.uploads import MAX_SPEC_BYTES, read_submission
from archtree_cli.client import MAX_IDEMPOTENCY_KEY_CHARS, is_idempotency_key, shown_key
from search.artifacts import ARTIFACT_NAMES
from workers.artifact_store import ArtifactStoreError
from workers.job_store import FINAL_STATUSES
from workers.tasks import result_name

router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    responses={**INVALID, **UNAVAILABLE},
    dependencies=[Depends(only_known_query_parameters)],
)

# Far beyond any real job list, and far below the 64-bit range Redis takes.
MAX_OFFSET = 10**9

NOT_FOUND = {404: {"model": ErrorMessage, "description": "No job with this id."}}

SUBMISSION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec"],
                    "additionalProperties": False,
                    "properties": {
                        "spec": {
                            "$ref": "#/components/schemas/JobSpecIn",
                            "description": f"The job as JSON (a form field, or a file), at most "
                            f"{MAX_SPEC_BYTES} bytes.",
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "Trained weights: .safetensors or a torch state dict.",
                        },
                        "data": {
                            "type": "string",
                            "format": "binary",
                            "description": ".npz or .pt holding x (N,C,H,W or N,H,W images; "
                            "for a module: model, any sample shape, such as N,F or N,C,L) and "
                            "optionally integer labels y; replaces spec.data.",
                        },
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    summary="Submit a job",
    openapi_extra=SUBMISSION_BODY,
    responses={
        409: {
            "model": ErrorMessage,
            "description": "A submission with this Idempotency-Key is still being checked; "
            "Retry-After says when to send it again.",
        },
        413: {"model": ErrorMessage, "description": "An upload exceeds its size limit."},
        422: {
            "model": ErrorMessage,
            "description": "The job cannot run as given (why, in one line).",
        },
    },
)
async def submit_job(
    request: Request,
    services: ServicesDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="The client's name for this submission (such as a random UUID): "
            "sent again with the same key within a day, after an answer that never arrived, "
            "the submission gets the job the first one created, in its status now, and "
            "creates no other; sent with another submission, it is refused (422). 1 to 200 "
            "printable ASCII characters.",
        ),
    ] = None,
) -> JobCreated:
    """Check the job (budget, search settings, device class, that the model builds, the weights
    load and a sample runs forward), store its uploads and queue it. Nothing is kept when a
    check fails. Sent again with its Idempotency-Key, it answers the job the first created,
    `replayed` true."""
    sent = len(request.headers.getlist("idempotency-key"))
    if sent > 1:
        raise HTTPException(
            422, f"the Idempotency-Key header is sent {sent} times: send one key per submission"
        )
    key = checked_idempotency_key(idempotency_key)
    form = await read_submission(request, services.settings)
    try:
        # The address the client reached the API at: messages to it name the API so.
        api_url = str(request.base_url).rstrip("/")
        job_id, status, replayed = await run_in_threadpool(
            submission.submit, services, form, api_url, key
        )
    except submission.SubmissionInProgress:
        raise HTTPException(
            409,
            "a submission with this Idempotency-Key is still being checked: send it again in "
            "a few seconds to get its job",
            headers={"Retry-After": str(IN_PROGRESS_RETRY_S)},
        ) from None
    finally:
        await form.close()
    return JobCreated(id=job_id, status=status, replayed=replayed, links=JobLinks.of(job_id))


# The seconds a client is told to wait before sending again a submission still being checked.
IN_PROGRESS_RETRY_S = 2


def checked_idempotency_key(key: str | None) -> str | None:
    """`key` once it is 1 to 200 printable ASCII characters; 422 otherwise."""
    if key is None:
        return None
    if not is_idempotency_key(key):
        raise HTTPException(
            422,
            f"the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} printable "
            f"ASCII characters, such as a random UUID, not {shown_key(header_as_sent(key))}",
        )
    return key


@router.get("", summary="List jobs, newest first")
async def list_jobs(
    services: ServicesDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Jobs to skip.")] = 0,
    limit: Annotated[int, Query(ge=1, le=200, description="Jobs in this page.")] = 20,
    status: Annotated[
        list[JobStatus] | None,
        Query(description="Only jobs in this status; repeat it for several (`total` counts them)."),
    ] = None,
) -> JobList:
    jobs, total = await read_jobs(
        services.async_client, services.jobs, offset, limit, statuses=status or ()
    )
    return JobList(jobs=[Job.of(job) for job in jobs], total=total, offset=offset, limit=limit)


@router.get(
    "/{job_id}", summary="A job's status and progress", responses=NOT_FOUND, response_model=Job
)
async def get_job(job: JobDep, services: ServicesDep) -> Response:
    lost = []
    if job["status"] not in FINAL_STATUSES:
        lost = await read_lost_tasks(services.async_client, services.leases, job["id"])
    # Dashboards poll this: the answer is serialized once, not validated again on its way out.
    answer = Job.of(job, lost_tasks=[task.to_dict() for task in lost])
    return Response(answer.model_dump_json(), media_type="application/json")


@router.get("/{job_id}/tree", summary="The job's search tree so far", responses=NOT_FOUND)
def get_tree(job: JobDep, services: ServicesDep) -> JobTree:
    return JobTree.of(job, services.jobs.load_state(job["id"]))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="The job's events, live (Server-Sent Events)",
    # Its errors are JSON, not events.
    responses=as_json({**NOT_FOUND, **INVALID, **UNAVAILABLE}),
)
async def stream_events(
    job: JobDep,
    services: ServicesDep,
    after: Annotated[str, Depends(start_after)],
) -> AsyncIterator[ServerSentEvent]:
    """Every event of the job from the start (or after Last-Event-ID), then new ones as they
    happen; the stream ends once the job has ended and all its events are sent."""
    async for event in job_events(services.jobs, job["id"], after, services.leases):
        yield event


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    summary="Cancel a job",
    responses={
        **NOT_FOUND,
        409: {
            "model": ErrorMessage,
            "description": "The job has already ended: the message says what can be done with "
            "it instead (fetch its results, delete it, submit it again).",
        },
    },
)
def cancel_job(job: JobDep, services: ServicesDep) -> Job:
    """Ask the job to stop: a queued job, or one waiting for its device before its first
    step, ends as `cancelled` at once; a running one within a second or so (at its next check,
    inside a measurement or a fine-tune). A cancel asked again, or by several clients at once,
    is recorded once (one `cancel_requested` event): the others are answered 202 while the job
    runs, 409 once it has ended."""
    if not services.jobs.request_cancel(job["id"]):
        # Read again: it may have ended since it was read, or been deleted once it had.
        now = services.jobs.get(job["id"])
        if now is None:
            raise HTTPException(status_code=404, detail=f"no job {job['id']}")
        raise HTTPException(status_code=409, detail=ended_job_text(now))
    return Job.of(services.jobs.get(job["id"]) or job)


def ended_job_text(job: dict[str, Any]) -> str:
    """That a job which has ended has nothing to cancel, and what can be done with it."""
    job_id, status = job["id"], job["status"]
    if status == "succeeded":
        instead = (
            f"fetch its results with GET /v1/jobs/{job_id}/artifacts/{{name}} "
            f"({', '.join(ARTIFACT_NAMES)}), or delete it with DELETE /v1/jobs/{job_id}"
        )
    else:
        instead = (
            f"delete it with DELETE /v1/jobs/{job_id}, or submit its spec again with POST /v1/jobs"
        )
    return f"job {job_id} has already ended ({status}): there is nothing to cancel; {instead}"


@router.delete(
    "/{job_id}",
    status_code=204,
    summary="Delete an ended job",
    responses={
        **NOT_FOUND,
        409: {"model": ErrorMessage, "description": "The job has not ended: cancel it first."},
    },
)
def delete_job(job: JobDep, services: ServicesDep) -> Response:
    """Delete a job that has ended (succeeded, failed or cancelled) and all the service keeps
    of it: its uploads and result files in the artifact store, its record, events and tree in
    Redis, and the Idempotency-Key it was submitted with. 409 for a job that has not ended:
    cancel it, then delete it."""
    if job["status"] not in FINAL_STATUSES and job.get("cancel_requested"):
        raise HTTPException(
            status_code=409,
            detail=f"job {job['id']} has not ended ({job['status']}, cancel requested): it "
            "stops within seconds; delete it once its status is cancelled",
        )
    if job["status"] not in FINAL_STATUSES:
        raise HTTPException(
            status_code=409,
            detail=f"job {job['id']} has not ended ({job['status']}): cancel it first (POST "
            f"/v1/jobs/{job['id']}/cancel), then delete it once it has ended",
        )
    # Files first: a store that fails leaves the job listed, to be deleted again.
    services.artifacts.delete_folder(f"jobs/{job['id']}")
    if not services.jobs.delete_ended(job["id"]):  # an ended job never runs again: gone
        raise HTTPException(status_code=404, detail=f"no job {job['id']}")
    return Response(status_code=204)


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="A result file of a succeeded job",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/json": {}, "application/octet-stream": {}}},
        **NOT_FOUND,
    },
)
def get_artifact(job: JobDep, name: str, services: ServicesDep) -> StreamingResponse:
    """`report.json`, `arch.json` or `model.safetensors`, once the job has succeeded."""
    if name not in ARTIFACT_NAMES:
        raise HTTPException(
            status_code=404,
            detail=f"no artifact {quoted(name)}: a job's results are {', '.join(ARTIFACT_NAMES)}",
        )
    stored = result_name(job["id"], name)
    if not services.artifacts.exists(stored):
        if job["status"] == "succeeded":  # its results were written: the store lost them
            raise ArtifactStoreError(
                f"{stored} is missing from the artifact store {services.artifacts.root}, though "
                f"job {job['id']} succeeded; check ARCHTREE_ARTIFACTS_URL",
                for_client=f"job {job['id']} succeeded, but its {name} is missing from the "
                "service's file store",
            )
        why = f"; its error says why: GET /v1/jobs/{job['id']}" if job["status"] == "failed" else ""
        detail = (
            f"job {job['id']} has no {name}: it ended {job['status']}, without results{why}"
            if job["status"] in FINAL_STATUSES
            else f"job {job['id']} has no {name} yet: it is {job['status']}; results exist once "
            "it has succeeded"
        )
        raise HTTPException(status_code=404, detail=detail)
    if name == "report.json":
        return _report_in_spec_terms(services.artifacts.get_bytes(stored))
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(
        _chunks(services.artifacts.open_stream(stored)),
        media_type=media,
        headers={
            "Content-Length": str(services.artifacts.size(stored)),
            "Content-Disposition": f'attachment; filename="{name}"',
        },
    )


def _report_in_spec_terms(stored: bytes) -> Response:
    """report.json with its notes naming spec fields (`search.width`), as the job's do; the
    engine words them for `archtree prune` (`--width`)."""
    try:
        report = json.loads(stored)
        notes = [in_spec_terms(note) for note in report["notes"]]
    except (ValueError, TypeError, KeyError):  # not a report of this version: as stored
        content = stored
    else:
        content = json.dumps({**report, "notes": notes}, indent=2).encode()
    return Response(
        content,
        media_type="application/json",
        headers={"Content-Disposition": 'attachment; filename="report.json"'},
    )


def _chunks(stream: BinaryIO, size: int = 1 << 20) -> Iterator[bytes]:
    with stream:
        while chunk := stream.read(size):
            yield chunk
