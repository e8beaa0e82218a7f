"""Direct dispatch (api/direct.py): an endpoint that takes only the request is called without
FastAPI's routing, and answers exactly as it does through it: its response, the app's error
handlers, a 500 with an incident id for the unexpected, the route's template in the metrics."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from strongroom.api import direct
from strongroom.api import errors as api_errors
from strongroom.errors import InvalidRequest

router = APIRouter()
seen: list[str] = []


@router.post("/v1/things")
async def things(request: Request) -> Response:
    seen.append(request.scope["route"].path)
    kind = request.query_params.get("fail")
    if kind == "invalid":
        raise InvalidRequest("Invalid integer: 12x", param="amount")
    if kind == "http":
        raise HTTPException(404)
    if kind == "teapot":
        raise HTTPException(418)
    if kind == "bug":
        raise RuntimeError("internal detail 4242424242424242")
    return JSONResponse({"ok": True})


@router.post("/v1/things/{thing_id}")
async def one_thing(request: Request, thing_id: str) -> Response:
    return JSONResponse({"id": thing_id})


async def _teapot(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"type": "invalid_request_error", "message": "teapot"}}, 418, {"X-Kind": "status"})


def _app(with_direct: bool) -> FastAPI:
    app = FastAPI()
    api_errors.install(app)
    app.add_exception_handler(418, _teapot)  # a handler by status, looked up before the class
    app.include_router(router)
    if with_direct:
        app.add_middleware(direct.Direct, routes=direct.table([router]))
    return app


def test_only_fixed_paths_whose_endpoint_takes_just_the_request_are_direct():
    assert set(direct.table([router])) == {("POST", "/v1/things")}


@pytest.mark.parametrize("fail", ["", "invalid", "http", "teapot", "bug"])
async def test_direct_answers_exactly_as_routing_does(fail):
    answers = []
    for with_direct in (False, True):
        transport = httpx.ASGITransport(app=_app(with_direct), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.post("/v1/things", params={"fail": fail} if fail else None)
        body = response.json()
        if fail == "bug":  # a fresh incident id each time
            assert body["error"]["message"].startswith("An unexpected error occurred (inc_")
            assert "4242" not in response.text
            body["error"]["message"] = "incident"
        answers.append((response.status_code, body, sorted(response.headers.multi_items())))
    assert answers[0] == answers[1]
    assert answers[0][0] == {"": 200, "invalid": 400, "http": 404, "teapot": 418, "bug": 500}[fail]
    if fail == "teapot":
        assert ("x-kind", "status") in answers[1][2]


async def test_direct_route_carries_its_template_and_other_requests_still_route():
    seen.clear()
    transport = httpx.ASGITransport(app=_app(True))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/v1/things")).status_code == 200
        assert (await client.post("/v1/things/th_1")).json() == {"id": "th_1"}
        wrong_method = await client.get("/v1/things")
    assert seen == ["/v1/things"]
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_payment_intent_requests_are_counted_under_their_route(api, anonymous):
    await api.post("/v1/payment_intents", data={"amount": "x", "currency": "usd"})
    metrics = (await anonymous.get("/metrics")).text
    assert 'strongroom_http_requests_total{method="POST",route="/v1/payment_intents",status="400"}' in metrics
