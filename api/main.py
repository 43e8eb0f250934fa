"""The FastAPI app: `create_app(settings)`, and `app` for `uvicorn api.main:app`.

`app` is made on first access from the ARCHTREE_* environment, so importing this module
needs no configuration.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse

from api.deps import Services
from api.error_handlers import add_error_handlers
from api.event_stream import end_streams_on_stop
from api.head_requests import HeadAsGet
from api.routes import dashboard, devices, health, jobs
from api.schemas import JobSpecIn
from archtree_cli.settings import ServiceSettings, service_settings

DESCRIPTION = """
Archtree finds the most accurate structurally pruned version of a PyTorch model that meets a
latency budget measured on the target device. Submit a job, follow its progress and search
tree (or its live events), and fetch `arch.json`, `model.safetensors` and `report.json`.
Device agents register here and time candidates on their hardware.

Every error answers `{"detail": "<one line: what is wrong and what to do>"}`. Paths end without
a slash: `/v1/jobs/` is not redirected, it answers 404 naming `/v1/jobs`. Every GET route
answers HEAD too: the same status and headers (Content-Length included), without the body.
"""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The API for `settings` (default: from the environment)."""
    services = Services.connect(settings or service_settings())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Everything imported so far (torch among it) lives as long as the process. Left to the
        # collector, each full collection walks those few hundred thousand objects, a pause of
        # about 0.2 s for every request in flight; frozen, it skips them.
        gc.collect()
        gc.freeze()
        end_streams_on_stop()
        yield
        await services.aclose()

    app = FastAPI(
        title="Archtree",
        version="0.1.0",
        summary="Latency-aware structured pruning as a service.",
        description=DESCRIPTION,
        lifespan=lifespan,
        # A path with a trailing slash answers 404 naming the one without it
        # (api.error_handlers): a redirect would make a client that does not follow it, as
        # curl without -L, submit nothing without a word.
        redirect_slashes=False,
        # Served by _add_docs from the dashboard's files: FastAPI's own load them from a CDN.
        docs_url=None,
        redoc_url=None,
    )
    app.state.services = services
    app.include_router(jobs.router)
    app.include_router(devices.router)
    app.include_router(health.router)
    dashboard.mount(app)
    _add_docs(app)
    add_error_handlers(app)
    app.add_middleware(HeadAsGet)
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, plus JobSpecIn: the submission's `spec` part, which no route declares
    as a parameter because the multipart body is read as it streams."""
    schema = FastAPI.openapi(app)  # made once, then cached by FastAPI
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if "JobSpecIn" not in components:
        spec = JobSpecIn.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(spec.pop("$defs", {}), JobSpecIn=spec)
    return schema


def _add_docs(app: FastAPI) -> None:
    """The API's docs at /docs: Swagger UI from the dashboard's vendored copy
    (swagger-ui-dist 5.36.0 under api/dashboard/vendor/), so that they work offline. /redoc,
    whose page would load ReDoc and its fonts from the internet, goes to them."""

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} API",
            swagger_js_url=f"{root}/dashboard/vendor/swagger-ui-bundle.js",
            swagger_css_url=f"{root}/dashboard/vendor/swagger-ui.css",
            swagger_favicon_url="data:,",
            # No badge from the online validator: nothing is asked of another host.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/docs")


@functools.cache
def _default_app() -> FastAPI:
    return create_app()


def __getattr__(name: str) -> FastAPI:
    if name == "app":
        return _default_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
