"""Response headers on every route (issue 17 item 7).

PCI DSS 6.2.4 (SECURITY.md P9, common flaws): every response, errors included, says
`Cache-Control: no-store` (card facts and customer data are never kept by a browser or proxy),
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`. PCI DSS 4.2.1 (SECURITY.md
P8): `Strict-Transport-Security` over TLS only (RFC 6797 §7.2). The route table is read from the app
itself, so a new route cannot escape; the error paths that leave the app's routing (404, 405, 413,
an unexpected 500, admission control's 503) are each checked.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.requests import Request
from starlette.responses import JSONResponse
from tests.conftest import make_settings

from strongroom.api.body import MAX_BODY_BYTES
from strongroom.app import create_app

HSTS = "max-age=63072000; includeSubDomains"


def assert_security_headers(response: httpx.Response, *, tls: bool) -> None:
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert response.headers.get("cache-control") == "no-store", where
    assert response.headers.get("x-content-type-options") == "nosniff", where
    assert response.headers.get("referrer-policy") == "no-referrer", where
    for name in ("cache-control", "x-content-type-options", "referrer-policy"):
        assert len(response.headers.get_list(name)) == 1, f"{where}: {name} sent twice"
    if tls:
        assert response.headers.get("strict-transport-security") == HSTS, where
    else:
        assert "strict-transport-security" not in response.headers, where


def _route_requests(app: FastAPI) -> list[tuple[str, str]]:
    found = set()
    for route in iter_route_contexts(app.routes):
        for method in (route.methods or set()) - {"HEAD"}:
            found.add((method, re.sub(r"\{[^}]+\}", "x_missing", route.path)))
    return sorted(found)


@pytest.fixture
async def tls_api(app: FastAPI, merchant) -> AsyncIterator[httpx.AsyncClient]:
    """As `api`, on a TLS listener (the scheme the server sees is https)."""
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="https://testserver", headers=headers) as client:
        yield client


async def test_pci_6_2_4_every_route_answers_with_no_store_nosniff_and_no_referrer(app, api, anonymous):
    routes = _route_requests(app)
    assert ("POST", "/v1/elements/payment_methods") in routes  # the card endpoints are walked too
    for method, path in routes:
        for client in (api, anonymous):
            assert_security_headers(await client.request(method, path), tls=False)


async def test_pci_4_2_1_hsts_on_every_route_over_tls_only(app, tls_api):
    for method, path in _route_requests(app):
        assert_security_headers(await tls_api.request(method, path), tls=True)


async def test_pci_6_2_4_router_errors_carry_the_headers(api, tls_api):
    missing = await api.get("/no/such/path")
    assert missing.status_code == 404
    assert_security_headers(missing, tls=False)
    wrong_method = await api.put("/v1/customers")
    assert wrong_method.status_code == 405
    assert_security_headers(wrong_method, tls=False)
    too_large = await tls_api.post("/v1/customers", content=b"x" * (MAX_BODY_BYTES + 1))
    assert too_large.status_code == 413
    assert_security_headers(too_large, tls=True)
    no_key = await api.get("/v1/customers", headers={"Authorization": ""})
    assert no_key.status_code == 401
    assert_security_headers(no_key, tls=False)


@pytest.fixture
async def fragile_app(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, asyncio.Event]]:
    """The app with one request in flight allowed, and two routes added for the test: one that
    fails unexpectedly (the 500 path) and one that holds its slot until released (the 503 path)."""
    app = create_app(make_settings(database_url, tmp_path, http={"max_inflight": 1}), background=False)
    release = asyncio.Event()

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("unexpected")

    async def hold(request: Request) -> JSONResponse:
        await release.wait()
        return JSONResponse({})

    app.add_api_route("/v1/test_boom", boom, methods=["GET"])
    app.add_api_route("/v1/test_hold", hold, methods=["GET"])
    async with app.router.lifespan_context(app):
        yield app, release


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_pci_6_2_4_unexpected_500_and_shed_503_carry_the_headers(fragile_app, scheme):
    app, release = fragile_app
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://testserver") as client:
        failed = await client.get("/v1/test_boom")
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "api_error"
        assert_security_headers(failed, tls=scheme == "https")
        held = asyncio.create_task(client.get("/v1/test_hold"))
        for _ in range(100):
            shed = await client.get("/v1/customers")
            if shed.status_code == 503:
                break
            await asyncio.sleep(0.01)
        assert shed.status_code == 503
        assert shed.json()["error"]["code"] == "overloaded"
        assert_security_headers(shed, tls=scheme == "https")
        release.set()
        assert (await held).status_code == 200


async def test_the_card_form_keeps_its_own_policy_beside_the_common_headers(anonymous):
    page = await anonymous.get("/v1/elements/card", params={"session": "bad"})
    assert "frame-ancestors" in page.headers["content-security-policy"]
    assert_security_headers(page, tls=False)
