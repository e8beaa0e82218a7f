"""The one place that turns exceptions into HTTP responses with Stripe's error JSON."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

import orjson
import structlog
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from strongroom.api import headers as security_headers
from strongroom.errors import Overloaded, StrongroomError
from strongroom.redact import redact, redact_value

log = structlog.get_logger(__name__)


def error_body(exc: StrongroomError) -> bytes:
    # The message and param are masked when the error is raised; `extra` may echo input too.
    return orjson.dumps({"error": redact_value(exc.as_dict())})


def error_response(exc: StrongroomError, headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    if exc.http_status == 401:
        extra.setdefault("WWW-Authenticate", 'Bearer realm="Strongroom"')
    if exc.http_status in (409, 429, 502, 503):
        extra.setdefault("Retry-After", "1")
    if exc.http_status == 400 and exc.type == "idempotency_error":
        # stripe-python retries on some failures unless told not to; a mismatch never heals.
        extra.setdefault("Stripe-Should-Retry", "false")
    return Response(error_body(exc), exc.http_status, headers=extra, media_type="application/json")


def _request_error(
    message: str, status: int, code: str | None = None, headers: Mapping[str, str] | None = None
) -> Response:
    # The message may quote the URL path or a framework's detail: PCI DSS 3.4.1, mask any PAN.
    body: dict[str, object] = {"type": "invalid_request_error", "message": redact(message)}
    if code:
        body["code"] = code
    return Response(orjson.dumps({"error": body}), status, headers=headers, media_type="application/json")


_METHODS = ("GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """The methods some route on this path fully matches. Starlette's own `Allow` names only the
    first route's (GET on /v1/customers/{id}, without its POST and DELETE); FastAPI nests routers,
    so each method is probed through the app's routing rather than read off flat routes."""
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def install(app: FastAPI) -> None:
    @app.exception_handler(StrongroomError)
    async def _domain(request: Request, exc: StrongroomError) -> Response:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            return _request_error(
                f"Unrecognized request URL ({request.method}: {request.url.path}).", 404, "resource_missing"
            )
        if exc.status_code == 405:
            # RFC 9110 §15.5.6: a 405 lists the resource's methods in `Allow`.
            return _request_error(
                f"Unrecognized request URL ({request.method}: {request.url.path}).",
                405,
                "method_not_allowed",
                {"Allow": _allowed_methods(request)},
            )
        return _request_error(str(exc.detail), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _request_error("Invalid request.", 400, "parameter_invalid")

    @app.exception_handler(sa_exc.TimeoutError)
    async def _pool_exhausted(request: Request, exc: sa_exc.TimeoutError) -> Response:
        # No pooled connection in time: nothing was done, the client may retry.
        return error_response(Overloaded())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # Never echo internals (they may hold card data or SQL): log with an id, answer with it.
        incident = "inc_" + secrets.token_hex(8)
        log.error("request.failed", incident=incident, path=request.url.path, error_type=type(exc).__name__)
        body = {"error": {"type": "api_error", "message": f"An unexpected error occurred ({incident})."}}
        # Starlette sends this from its outermost layer, outside the app's middleware: the
        # security headers are added here.
        headers = security_headers.for_scheme(request.url.scheme)
        return Response(orjson.dumps(body), 500, headers=headers, media_type="application/json")
