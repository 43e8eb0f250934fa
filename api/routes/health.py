"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep
from api.monitoring import CONTENT_TYPE_LATEST, metrics_text, readiness
from api.schemas import Health, Readiness

router = APIRouter(tags=["health"])

NOT_READY = {503: {"model": Readiness, "description": "Redis is not reachable."}}


# HEAD too: uptime checkers and load balancers probe with it.
# HEAD gets its own operation: each (path, method) needs a unique operationId in OpenAPI.
@router.get("/healthz", summary="The API process is up")
@router.head("/healthz", summary="The API process is up", operation_id="healthz_head")
def healthz() -> Health:
    return Health()


@router.get("/readyz", summary="The service can take jobs", responses=NOT_READY)
@router.head(
    "/readyz",
    summary="The service can take jobs",
    responses=NOT_READY,
    operation_id="readyz_head",
)
async def readyz(services: ServicesDep, response: Response) -> Readiness:
    """Redis reachable (503 otherwise); also lists the Celery workers that answer a ping and the
    agents online per device class."""
    ready = await run_in_threadpool(readiness, services)
    if ready.status != "ready":
        response.status_code = 503
    return ready


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(services: ServicesDep) -> Response:
    """Jobs by status, measurements, queue depth and agents online per device class, and
    measurement round-trip times."""
    return Response(await run_in_threadpool(metrics_text, services), media_type=CONTENT_TYPE_LATEST)
