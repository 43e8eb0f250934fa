"""What routes share: settings, Redis, the job and artifact stores, the device registry, Celery."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import redis
import redis.asyncio
from celery import Celery
from fastapi import Depends, HTTPException, Path, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from api.job_reads import read_job
from archtree_cli.settings import ServiceSettings
from latency.device_registry import DeviceRegistry
from latency.redis_connection import async_redis_client, redis_client
from search.errors import ArchtreeError
from workers.artifact_store import ArtifactStore
from workers.job_store import JobStore
from workers.task_leases import TaskLeases

# How JobStore.create and the submission make job ids (uuid4().hex[:12]). Anything else names
# no job, and must not reach the job's other Redis keys (`{id}:state`, `{id}:events`, ...).
JOB_ID = re.compile(r"[0-9a-f]{12}")
# Values a client sent are echoed in error messages at most this long.
ECHO_CHARS = 80
# Unknown query parameters a refusal names at most.
NAMED_UNKNOWN = 5

# A dead Redis must make /readyz answer quickly, not after minutes of retries.
REDIS_CONNECT_TIMEOUT_S = 2.0
# A command that takes longer (Redis stalled: swapping, a slow disk, a debugger) answers 503,
# once: the API does not retry a timeout, so no request waits on a stalled Redis for longer.
REDIS_SOCKET_TIMEOUT_S = 5.0


@dataclass
class Services:
    """The API process's connections, created once per app.

    `async_client` serves the paths clients poll (a job's status, the job list) on the event
    loop; the rest uses `client` in the thread pool.
    """

    settings: ServiceSettings
    client: redis.Redis
    async_client: redis.asyncio.Redis
    jobs: JobStore
    artifacts: ArtifactStore
    registry: DeviceRegistry
    celery: Celery
    leases: TaskLeases

    @classmethod
    def connect(cls, settings: ServiceSettings) -> Services:
        """Connections for `settings` (lazy: nothing is reached before the first request)."""
        from workers.celery_app import create_app

        url = settings.resolved_redis_url()
        if not url:
            raise ArchtreeError(
                "the API needs Redis: set ARCHTREE_REDIS_URL (e.g. redis://localhost:6379/0), "
                "or start the whole stack with `archtree up`"
            )
        timeouts = {
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
            "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
            "retry_timeouts": False,
        }
        client = redis_client(url, **timeouts)
        return cls(
            settings=settings,
            client=client,
            async_client=async_redis_client(url, **timeouts),
            jobs=JobStore(client),
            artifacts=ArtifactStore(settings.artifacts_url),
            registry=DeviceRegistry(client, settings.heartbeat_ttl_s),
            # A submission sends the job's first task: not held by a stalled Redis either.
            celery=create_app(settings, publish_timeout_s=REDIS_SOCKET_TIMEOUT_S),
            leases=TaskLeases.of(client, settings),
        )

    def agent_redis_url(self) -> str:
        """The Redis URL agents registering through the API are told to use."""
        return self.settings.agent_redis_url or self.settings.resolved_redis_url()

    async def aclose(self) -> None:
        await self.async_client.aclose()
        self.close()

    def close(self) -> None:
        self.client.close()
        self.celery.close()


# Async although it awaits nothing: a sync dependency would cost a thread-pool hop per request.
async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]

JobId = Annotated[str, Path(description="The job's id.", examples=["4f1c2a9be07d"])]


def quoted(value: str) -> str:
    """`value` as a Python literal for an error message, cut to ECHO_CHARS characters."""
    if len(value) > ECHO_CHARS:
        return repr(value[: ECHO_CHARS - 3]) + "..."
    return repr(value)


def header_as_sent(header: str) -> str:
    """A header as the client wrote it: HTTP hands over bytes, which Starlette decodes as
    latin-1; a client sending UTF-8 (most do) sees its own text echoed."""
    try:
        return header.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header


async def existing_job(job_id: JobId, services: ServicesDep) -> dict[str, Any]:
    """The job's record; 404 when no job has this id."""
    job = None
    if JOB_ID.fullmatch(job_id):
        job = await read_job(services.async_client, services.jobs, job_id)
    if job is None:
        raise HTTPException(
            status_code=404, detail=f"no job {quoted(job_id)}: list the jobs with GET /v1/jobs"
        )
    return job


JobDep = Annotated[dict[str, Any], Depends(existing_job)]


async def only_known_query_parameters(request: Request) -> None:
    """422 for a query parameter the route does not take: a misspelt filter (`?stauts=failed`)
    would otherwise be ignored, and the answer taken for a filtered one. A dependency of the
    /v1 routers, so that it runs before the route's own parameters are read."""
    if not request.scope.get("query_string"):
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    taken, lists = _query_parameters_of(route)
    unknown = [name for name in request.query_params if name not in taken]
    if unknown:
        raise HTTPException(
            status_code=422,
            detail=unknown_query_text(f"{request.method} {route.path}", unknown, taken),
        )
    for name in dict.fromkeys(request.query_params):
        count = len(request.query_params.getlist(name))
        if count > 1 and name not in lists:
            raise HTTPException(
                status_code=422,
                detail=f"the query parameter {quoted(name)} is given {count} times: give it once",
            )


def unknown_query_text(request: str, unknown: list[str], taken: tuple[str, ...]) -> str:
    """That `request` takes none of the query parameters `unknown`, and which it takes."""
    said = []
    for name in unknown[:NAMED_UNKNOWN]:
        close = difflib.get_close_matches(name, taken, n=1)
        said.append(quoted(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    if len(unknown) > NAMED_UNKNOWN:
        said.append(f"{len(unknown) - NAMED_UNKNOWN} more")
    plural = "s" if len(unknown) > 1 else ""
    if not taken:
        takes = "it takes none; send it without a query string"
    elif len(taken) == 1:
        takes = f"it takes {taken[0]} only"
    else:
        takes = f"it takes {', '.join(taken[:-1])} and {taken[-1]}"
    return f"{request} has no query parameter{plural} {', '.join(said)}: {takes}"


def _query_parameters_of(route: APIRoute) -> tuple[tuple[str, ...], set[str]]:
    """The query parameters `route` reads, and those that take several values: read from its
    dependants once, and kept on the route (which never changes, and cannot be a dict key)."""
    known = route.__dict__.get(_QUERY_PARAMETERS)
    if known is None:
        known = route.__dict__[_QUERY_PARAMETERS] = (
            _query_parameters(route),
            _list_parameters(route),
        )
    return known


_QUERY_PARAMETERS = "_archtree_query_parameters"


def _list_parameters(route: APIRoute) -> set[str]:
    """The query parameters of `route` that take several values (`?status=a&status=b`)."""

    def read_by(dependant: Dependant) -> list[str]:
        names = [
            field.alias for field in dependant.query_params if _is_list(field.field_info.annotation)
        ]
        return names + [name for sub in dependant.dependencies for name in read_by(sub)]

    return set(read_by(route.dependant))


def _is_list(annotation: Any) -> bool:
    """Whether a parameter's type is a list, optional or annotated as it may be."""
    origin = get_origin(annotation)
    if origin in (list, tuple, set, frozenset):
        return True
    return origin in (Union, UnionType, Annotated) and any(
        _is_list(part) for part in get_args(annotation)
    )


def _query_parameters(route: APIRoute) -> tuple[str, ...]:
    """The query parameters `route` reads, its dependencies' included, in their order."""

    def read_by(dependant: Dependant) -> list[str]:
        names = [field.alias for field in dependant.query_params]
        return names + [name for sub in dependant.dependencies for name in read_by(sub)]

    return tuple(dict.fromkeys(read_by(route.dependant)))
