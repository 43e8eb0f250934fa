"""Every error as `{"detail": "<one line: what is wrong and what to do>"}`.

Besides the API's own HTTPExceptions: the engine's errors (422, worded for a REST client), the
request checks (422), Redis unreachable (503), the artifact store failing (503, its paths in
the server's log only), the framework's bare "Not Found" and "Method Not Allowed" (which then
say what exists, or the route a trailing slash missed) and its 400 for a body it cannot decode
(422). A client that hangs up mid-request gets an empty 400, and nothing is logged.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import kombu.exceptions
import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Mount

from api.deps import quoted
from api.schemas import validation_message
from api.spec_terms import in_spec_terms
from archtree_cli.client import NOTHING_AT
from search.errors import ArchtreeError, first_line
from workers.artifact_store import ArtifactStoreError
from workers.job_store import REDIS_UNREACHABLE

ENDPOINTS_HINT = "see /docs for the endpoints"
PROBED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
# What FastAPI says of a request body it could not decode.
UNPARSED_BODY = "There was an error parsing the body"
# Redis errors that say the store cannot serve now, not that the request is wrong: unreachable,
# out of memory, a read-only replica after a failover, still loading its data.
# Redis unreachable, as a command or a task's send (kombu's OperationalError: the broker's Redis
# did not answer, workers.celery_app) meets it.
UNREACHABLE = (*REDIS_UNREACHABLE, kombu.exceptions.OperationalError)
REDIS_UNAVAILABLE = (
    *UNREACHABLE,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.ExecAbortError,
)
# uvicorn's own log, where the server's lines go.
server_log = logging.getLogger("uvicorn.error")
# Seconds a client is asked to wait before retrying while Redis is unreachable.
REDIS_RETRY_AFTER_S = 5


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in one line that says what to do."""
    app.add_exception_handler(ArchtreeError, _user_error)
    app.add_exception_handler(ArtifactStoreError, _store_unavailable)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    # redis.asyncio raises these same classes.
    for unavailable in REDIS_UNAVAILABLE:
        app.add_exception_handler(unavailable, _redis_unavailable)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)


async def _client_gone(request: Request, _: Exception) -> Response:
    """A client that went away mid-request (an upload cut off): nobody reads the answer, and
    it is no server error: one line in the log says so."""
    server_log.info(
        "%s %s: the client hung up before its request ended; nothing was kept",
        request.method,
        request.url.path,
    )
    return Response(status_code=400)


async def _user_error(_: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": in_spec_terms(str(error))})


async def _store_unavailable(request: Request, error: Exception) -> JSONResponse:
    """The store's paths go to the operator's log, not to the client."""
    assert isinstance(error, ArtifactStoreError)
    server_log.error("%s %s: %s", request.method, request.url.path, error)
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        content={
            "detail": f"{error.for_client}: the operator's to fix (the API's log says where); "
            "try again later"
        },
    )


async def _invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    errors = list(error.errors())
    first = errors[0]
    if first.get("type") == "json_invalid":
        position = first.get("loc", ())[-1]
        reason = first.get("ctx", {}).get("error", "JSON decode error")
        detail = f"the body is not valid JSON ({reason} at character {position}): "
        detail += _send_json_object(request)
    elif tuple(first.get("loc", ())) == ("body",):
        sent_as = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if first.get("type") == "missing":
            what = "missing"
        elif sent_as and sent_as != "application/json" and not sent_as.endswith("+json"):
            what = f"sent as {sent_as}, not read as JSON"
        else:
            what = "not a JSON object"
        detail = f"the body is {what}: {_send_json_object(request)}"
    else:
        detail = validation_message(errors)
    return JSONResponse(status_code=422, content={"detail": detail})


def _send_json_object(request: Request) -> str:
    """What to send instead of a body that is no JSON object: the route's body model's
    example."""
    field = getattr(request.scope.get("route"), "body_field", None)
    model = field.field_info.annotation if field is not None else None
    examples: list[Any] = []
    if isinstance(model, type) and issubclass(model, BaseModel):
        examples = model.model_json_schema().get("examples", [])
    like = f" like {json.dumps(examples[0])}" if examples else f" ({ENDPOINTS_HINT})"
    return f"send a JSON object{like} with Content-Type: application/json"


async def _redis_unavailable(_: Request, error: Exception) -> JSONResponse:
    reason = first_line(error) or "no answer"
    reached = not isinstance(error, UNREACHABLE)
    problem = "has a Redis that cannot serve now" if reached else "cannot reach its Redis"
    # Redis's own reasons (out of memory, loading) are the client's to know; those of an
    # unreachable one name its address, which is the operator's: in the log.
    said = f"{type(error).__name__}: {reason}" if reached else type(error).__name__
    if not reached:
        server_log.warning("Redis unreachable: %s: %s", type(error).__name__, reason)
    return JSONResponse(
        status_code=503,
        headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        content={
            "detail": f"the service {problem} ({said}); try again shortly, or ask the operator "
            "to check ARCHTREE_REDIS_URL"
        },
    )


async def _http_error(request: Request, error: Exception) -> Response:
    """HTTPExceptions as FastAPI answers them, the framework's bare 404 and 405 made to say
    what exists."""
    assert isinstance(error, HTTPException)
    path = quoted(request.url.path)
    if error.status_code == 400 and error.detail == UNPARSED_BODY:
        # FastAPI's answer to a JSON body that is not UTF-8 text.
        send = _send_json_object(request)
        error = HTTPException(422, f"the body cannot be read as JSON text (is it UTF-8?): {send}")
    elif error.status_code == 404 and error.detail == "Not Found":
        without_slash = request.url.path.rstrip("/")
        if without_slash != request.url.path and _is_route(request, without_slash):
            what = f"no route {path}: did you mean {quoted(without_slash)}? "
            error = HTTPException(404, f"{what}(paths end without a slash; {ENDPOINTS_HINT})")
        else:
            error = HTTPException(
                404,
                f"{NOTHING_AT}{path}: jobs and devices are under /v1/jobs and /v1/devices, the "
                f"dashboard at /; {ENDPOINTS_HINT}",
            )
    elif error.status_code == 405 and error.detail == "Method Not Allowed":
        # A mount (the dashboard's files) gives its own Allow header.
        given = (error.headers or {}).get("Allow", "")
        allowed = _methods_at(request) or [method.strip() for method in given.split(",")]
        use = f": use {' or '.join(allowed)}" if any(allowed) else ""
        error = HTTPException(
            405,
            f"{request.method} is not allowed on {path}{use}; {ENDPOINTS_HINT}",
            headers={"Allow": ", ".join(allowed)},
        )
    return await http_exception_handler(request, error)


def _is_route(request: Request, path: str) -> bool:
    """Whether a route of the app (not a mount: the dashboard's files) is at `path`, whatever
    its method."""
    scope = {**request.scope, "path": path}
    return any(
        not isinstance(route, Mount) and route.matches(scope)[0] is not Match.NONE
        for route in request.app.router.routes
    )


def _methods_at(request: Request) -> list[str]:
    """The methods the app's routes take at the request's path: Starlette's Allow header names
    only those of the first route there (POST, not GET, on /v1/devices)."""

    def routes_taking(method: str) -> set[int]:
        scope = {**request.scope, "method": method}
        routes = request.app.router.routes
        return {
            index for index, route in enumerate(routes) if route.matches(scope)[0] is Match.FULL
        }

    every_method = routes_taking("NO-SUCH-METHOD")  # mounts (the dashboard's files) take any
    return [method for method in PROBED_METHODS if routes_taking(method) - every_method]
