"""PCI DSS 10.2.1.4 (SECURITY.md P18), with the fields of 10.2.2 (P19): every failed authentication
leaves one structured event, with the origin IP and at most the key's kind and 4 characters after
it, never the key itself; the audit log picks these events up. Before, a thousand bad keys in a row
left no trace at all.
"""

from __future__ import annotations

import base64
import secrets

import httpx
from structlog.testing import capture_logs

from strongroom.api.auth import key_prefix

ORIGIN = "203.0.113.77"
ATTEMPTS = 200


def _failures(logs: list[dict]) -> list[dict]:
    return [event for event in logs if event["event"] == "auth.failed"]


async def test_pci_10_2_1_every_failed_key_is_logged_with_ip_and_prefix_never_the_key(app):
    transport = httpx.ASGITransport(app=app, client=(ORIGIN, 51000))
    keys = [f"sk_test_{secrets.token_urlsafe(24)}" for _ in range(ATTEMPTS)]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with capture_logs() as logs:
            for key in keys:
                response = await client.get("/v1/customers", headers={"Authorization": f"Bearer {key}"})
                assert response.status_code == 401
    failures = _failures(logs)
    assert len(failures) == ATTEMPTS  # one event per failure
    for event, key in zip(failures, keys, strict=True):
        assert event["ip"] == ORIGIN
        assert event["key_prefix"] == key[:12]
        assert event["reason"] == "unknown_key"
        assert event["path"] == "/v1/customers"
        assert event["log_level"] == "warning"
    rendered = repr(logs)
    for key in keys:
        assert key not in rendered
        assert key[:13] not in rendered  # nothing past the prefix


async def test_pci_10_2_1_missing_malformed_and_live_keys_are_logged_too(app, merchant):
    transport = httpx.ASGITransport(app=app, client=(ORIGIN, 51001))
    live_guess = "sk_live_" + secrets.token_urlsafe(24)
    basic = base64.b64encode(f"{live_guess}:".encode()).decode()
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        with capture_logs() as logs:
            assert (await client.get("/v1/customers")).status_code == 401
            assert (await client.get("/v1/customers", headers={"Authorization": "Token abc"})).status_code == 401
            assert (await client.get("/v1/customers", headers={"Authorization": f"Basic {basic}"})).status_code == 401
            # A merchant's real key works and logs nothing.
            good = await client.get("/v1/customers", headers={"Authorization": f"Bearer {merchant.secret_key}"})
            assert good.status_code == 200
    failures = _failures(logs)
    assert [(e["reason"], e["key_prefix"]) for e in failures] == [
        ("no_key", None),
        ("malformed_header", None),
        ("unknown_key", live_guess[:12]),
    ]
    assert all(e["ip"] == ORIGIN for e in failures)
    assert live_guess not in repr(logs) and merchant.secret_key not in repr(logs)


def test_key_prefix_keeps_at_most_the_kind_and_four_characters():
    assert key_prefix("sk_test_abcdefghijkl") == "sk_test_abcd"
    assert key_prefix("sk_live_abcdefghijkl") == "sk_live_abcd"
    assert key_prefix("4242424242424242") == "4242"
    assert key_prefix("sk_test_") == "sk_test_"
    assert key_prefix("") == ""
