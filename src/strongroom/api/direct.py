"""Direct dispatch for endpoints that take nothing but the request.

FastAPI routes every request through its exception middleware, an exit stack, two routers and
the dependency solver before the endpoint runs. For an endpoint whose only parameter is the
`Request` (every one of ours on a fixed path reads and validates its own parameters) none of that
does anything, yet it was a sixth of a payment's CPU in the server (py-spy, 2 workers, 32 clients).
`Direct` sits inside the app's own middleware (metrics, admission control) and calls such an
endpoint itself; errors go to the same handlers the app registered, so responses are unchanged.
Everything else (paths with parameters, unknown paths, other methods) goes through FastAPI."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _direct(route: APIRoute) -> bool:
    """Only the request as parameter, no dependencies: calling it directly is calling it."""
    d = route.dependant
    return (
        d.request_param_name is not None
        and not (d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params)
        and not d.dependencies
        and "{" not in route.path
    )


def table(routers: Iterable[APIRouter]) -> dict[tuple[str, str], APIRoute]:
    found: dict[tuple[str, str], APIRoute] = {}
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and _direct(route):
                for method in route.methods or ():
                    found.setdefault((method, route.path), route)
    return found


class Direct:
    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], APIRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method", ""), scope["path"])) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as the router would (request metrics label by its template)
        request = Request(scope, receive, send)
        try:
            response: Response = await route.endpoint(request)
        except Exception as exc:
            handler = _handler(scope["app"].exception_handlers, exc)
            if handler is None:
                raise  # as FastAPI's own routing does: the server-error handler answers it
            response = await handler(request, exc)
        await response(scope, receive, send)


def _handler(handlers: dict[Any, Handler], exc: Exception) -> Handler | None:
    """Starlette's lookup: an HTTP error's status first, then the nearest class in the
    exception's MRO; `Exception` itself belongs to the server-error middleware outside, which
    logs the incident and answers 500."""
    if isinstance(exc, HTTPException) and exc.status_code in handlers:
        return handlers[exc.status_code]
    for cls in type(exc).__mro__:
        if cls is Exception:
            return None
        if cls in handlers:
            return handlers[cls]
    return None
