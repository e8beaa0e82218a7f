"""The sandbox's 3-D Secure completion under hostile input.

PCI DSS 6.2.4 (SECURITY.md P9): `token=été` was a 500 (TypeError in `hmac.compare_digest`, which
refuses non-ASCII str). PCI DSS 6.4.2 (P10): guessing the token is rate limited per client IP and
per payment.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from tests.conftest import make_settings, new_merchant
from tests.payments.test_intents import processor_counts, three_ds_form, three_ds_intent

from strongroom.app import create_app


@pytest.mark.parametrize(
    "body",
    [
        {"data": {"token": "été", "result": "succeeded"}},
        {"data": {"token": "été", "result": "failed"}},
        {"json": {"token": "\u00e9\u00e9\u00e9", "result": "succeeded"}},
        {"json": {"token": "\U0001f4b3" * 40, "result": "succeeded"}},
        {
            "content": b"token=%C3%A9t%C3%A9&result=succeeded",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
    ],
    ids=["form", "form-failed", "json", "emoji", "percent-encoded"],
)
async def test_pci_6_2_4_non_ascii_3ds_token_is_a_404_and_changes_nothing(api, anonymous, merchant, services, body):
    intent = await three_ds_intent(api)
    path, _ = three_ds_form(intent)

    response = await anonymous.post(path, **body)

    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "resource_missing"
    after = (await api.get(f"/v1/payment_intents/{intent['id']}")).json()
    assert after["status"] == "requires_action"
    assert after["next_action"] == intent["next_action"]
    assert await processor_counts(services, merchant.id) == (0, 0)


@pytest.fixture
async def limited_app(database_url: str, data_dir: Path) -> AsyncIterator[FastAPI]:
    limits = {"threeds_per_ip": 8, "threeds_per_ip_window_s": 600, "threeds_per_intent": 4}
    application = create_app(make_settings(database_url, data_dir, ratelimit=limits), background=False)
    async with application.router.lifespan_context(application):
        yield application


async def test_pci_6_4_2_3ds_token_guessing_gets_a_429_per_payment_then_per_ip(limited_app):
    merchant = await new_merchant(limited_app.state.services)
    transport = httpx.ASGITransport(app=limited_app)
    auth = {"Authorization": f"Bearer {merchant.secret_key}"}
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=auth) as api,
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as browser,
    ):
        first, second = await three_ds_intent(api), await three_ds_intent(api)
        first_path, first_token = three_ds_form(first)
        second_path, second_token = three_ds_form(second)
        guesses = [
            (await browser.post(first_path, data={"token": f"guess{n}", "result": "succeeded"})) for n in range(6)
        ]
        # Even the right token waits once the payment's limit is reached.
        right_but_limited = await browser.post(first_path, data={"token": first_token, "result": "succeeded"})
        other_payment = await browser.post(second_path, data={"token": "guess", "result": "succeeded"})
        # 8 per IP: this address has now made 8 attempts.
        ip_limited = await browser.post(second_path, data={"token": second_token, "result": "succeeded"})
        after = (await api.get(f"/v1/payment_intents/{first['id']}")).json()

    assert [r.status_code for r in guesses] == [404] * 4 + [429] * 2
    assert guesses[-1].json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(guesses[-1].headers["retry-after"]) <= 900
    assert right_but_limited.status_code == 429
    assert other_payment.status_code == 404
    assert ip_limited.status_code == 429
    assert after["status"] == "requires_action"
