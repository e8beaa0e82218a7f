"""Admission control: beyond `http.max_inflight` requests per process, new API requests are shed
at once with 503 + Retry-After and do nothing (the surge half of the benchmark issue)."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from strongroom.app import _Admission


async def test_requests_beyond_the_inflight_limit_are_shed_with_503_and_retry_after() -> None:
    release = asyncio.Event()
    both_inside = asyncio.Event()
    entered = 0

    async def slow_app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal entered
        entered += 1
        if entered == 2:
            both_inside.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = _Admission(slow_app, max_inflight=2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        held = [asyncio.create_task(client.post("/v1/payment_intents")) for _ in range(2)]
        await asyncio.wait_for(both_inside.wait(), timeout=5)
        shed = await client.post("/v1/payment_intents")
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert entered == 2  # the shed request never reached the application
        health = client.get("/healthz")  # operational routes are never shed
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await health).status_code == 200
        assert (await client.post("/v1/payment_intents")).status_code == 200  # recovered
