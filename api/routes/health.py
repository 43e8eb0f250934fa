"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from api.deps import ServicesDep
from api.monitoring import CONTENT_TYPE_LATEST, metrics_text, readiness
from api.schemas import Health, Readiness

router = APIRouter(tags=["health"])

NOT_READY = {503: {"model": Readiness, "description": "Redis is not reachable."}}


# HEAD too, as on every GET route (api.head_requests): uptime checkers probe with it.
@router.get("/healthz", summary="The API process is up")
def healthz() -> Health:
    return Health()


@router.get("/readyz", summary="The service can take jobs", responses=NOT_READY)
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
