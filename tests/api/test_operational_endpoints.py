"""Operational endpoints (issue 17 item 8).

`/metrics` (PCI DSS 8.6, SECURITY.md P17: a service credential, compared in constant time): open in
development, behind a bearer token in production and not served at all without one. `/docs`
(PCI DSS 6.2.4, SECURITY.md P9): our own script-free page, nothing from a third-party host, under a
Content-Security-Policy that loads nothing and sandboxes the page into an opaque origin (so it is
never on the card form's origin); off by default in production. `/openapi.json` stays on.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from tests.conftest import make_settings

from strongroom.app import create_app

AppClient = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> AppClient:
    """A client of an app built with these settings (production needs its secrets configured)."""

    @asynccontextmanager
    async def client(*, development: bool, **http: Any) -> AsyncIterator[httpx.AsyncClient]:
        production: dict[str, Any] = {}
        if not development:
            production = {
                "auth": {"key_hash_secret": secrets.token_urlsafe(32)},
                "vault": {"allow_development_keystore": True},
            }
        settings = make_settings(
            database_url, tmp_path, development=development, http={"max_inflight": 1000, **http}, **production
        )
        app = create_app(settings, background=False)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 40000))
            async with httpx.AsyncClient(transport=transport, base_url="https://api.test") as http_client:
                yield http_client

    return client


async def test_pci_8_6_production_does_not_serve_metrics_or_docs_without_configuration(served):
    async with served(development=False) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/docs")).status_code == 404
        assert (await client.get("/docs/oauth2-redirect")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 200


async def test_pci_8_6_metrics_token_is_required_and_every_refusal_logged(served):
    token = secrets.token_urlsafe(32)
    async with served(development=False, metrics_token=token) as client:
        with capture_logs() as logs:
            assert (await client.get("/metrics")).status_code == 401
            wrong = await client.get("/metrics", headers={"Authorization": f"Bearer {token[:-1]}x"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["type"] == "invalid_request_error"
            # A token no ASCII comparison could take: refused, not a 500.
            foreign = await client.get("/metrics", headers={"Authorization": "Bearer été".encode()})
            assert foreign.status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
        assert "strongroom_http_requests_total" in ok.text
    failures = [e for e in logs if e["event"] == "auth.failed"]
    assert len(failures) == 3
    assert all(e["kind"] == "metrics" and e["ip"] == "198.51.100.9" for e in failures)
    assert token not in repr(logs) and token[:8] not in repr(logs)


async def test_development_keeps_metrics_open_unless_a_token_is_set(served):
    async with served(development=True) as client:
        assert (await client.get("/metrics")).status_code == 200
    async with served(development=True, metrics_token="t" * 32) as client:
        assert (await client.get("/metrics")).status_code == 401


async def test_pci_6_2_4_docs_are_local_script_free_and_sandboxed(served):
    async with served(development=True) as client:
        docs = await client.get("/docs")
        assert (await client.get("/docs/oauth2-redirect")).status_code == 404
    assert docs.status_code == 200
    assert docs.headers["content-type"].startswith("text/html")
    policy = docs.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in (p.strip() for p in policy.split(";")) if d}
    assert directives["default-src"] == ["'none'"]
    assert directives["sandbox"] == []  # an opaque origin: never the card form's
    assert directives["frame-ancestors"] == ["'none'"]
    assert "script-src" not in directives
    page = docs.text
    # The page's one inline style is the one the policy allows by hash, and nothing else is.
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert directives["style-src"] == [f"'sha256-{digest}'"]
    assert "<script" not in page.lower()
    # Nothing loaded from anywhere: the one link is to this server's own schema.
    assert re.findall(r'(?:src|href)="([^"]*)"', page) == ["/openapi.json"]
    assert "/v1/payment_intents/{intent_id}/confirm" in page
    assert docs.headers["cache-control"] == "no-store"


async def test_docs_follow_their_setting(served):
    async with served(development=True, docs_enabled=False) as client:
        assert (await client.get("/docs")).status_code == 404
    async with served(development=False, docs_enabled=True) as client:
        assert (await client.get("/docs")).status_code == 200
