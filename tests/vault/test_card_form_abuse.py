"""PCI DSS 6.4.1/6.4.2 (SECURITY.md P10): the hosted card form is no card-testing tool.

Issue 17 found one client secret creating six payment methods from `Origin: https://evil.example`,
and 300 bad secrets answered without a 429. Now a session creates one payment method (or a small
configured count), a submission must come from the form's page or the origin the merchant named,
and submissions are rate limited per client IP and per session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from tests.conftest import Merchant, make_settings, new_merchant
from tests.vault.test_hosted_form import FORM_ORIGIN, ORIGIN, VISA, _card, _session, _submit

from strongroom.app import create_app
from strongroom.payments.card_form import card_form_sessions
from strongroom.payments.tables import payment_methods
from strongroom.vault.tables import vault_cards

Clients = tuple[httpx.AsyncClient, httpx.AsyncClient, Merchant]


@pytest.fixture
def app_with(database_url: str, tmp_path: Path, data_dir: Path) -> Callable[..., AbstractAsyncContextManager[Clients]]:
    """An app of its own with these settings; yields (merchant api, browser, merchant)."""

    @asynccontextmanager
    async def make(**overrides: Any) -> AsyncIterator[Clients]:
        overrides.setdefault("ratelimit", {})
        application: FastAPI = create_app(make_settings(database_url, data_dir, **overrides), background=False)
        async with application.router.lifespan_context(application):
            merchant = await new_merchant(application.state.services)
            transport = httpx.ASGITransport(app=application)
            auth = {"Authorization": f"Bearer {merchant.secret_key}"}
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=auth) as api,
                httpx.AsyncClient(transport=transport, base_url="http://testserver") as browser,
            ):
                yield api, browser, merchant

    return make


async def _stored(services: Any, merchant_id: str) -> tuple[int, int]:
    """(payment methods, vault cards) of the merchant, as the database holds them."""
    async with services.db.read() as conn:
        pms = await conn.scalar(
            sa.select(sa.func.count()).select_from(payment_methods).where(payment_methods.c.merchant_id == merchant_id)
        )
        cards = await conn.scalar(
            sa.select(sa.func.count()).select_from(vault_cards).where(vault_cards.c.merchant_id == merchant_id)
        )
    return int(pms or 0), int(cards or 0)


async def test_pci_6_4_2_card_form_session_creates_one_payment_method(api, anonymous, merchant, services):
    session = await _session(api)
    first = await _submit(anonymous, session["client_secret"], **_card())
    again = [await _submit(anonymous, session["client_secret"], **_card("5555555555554444")) for _ in range(5)]

    assert first.status_code == 200, first.text
    for response in again:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "elements_session_used"
        assert "5555555555554444" not in response.text
    assert [pm["id"] for pm in (await api.get("/v1/payment_methods")).json()["data"]] == [first.json()["id"]]
    assert await _stored(services, merchant.id) == (1, 1)


async def test_pci_6_4_2_a_refused_card_does_not_use_the_session_up(api, anonymous):
    session = await _session(api)
    refused = await _submit(anonymous, session["client_secret"], **_card("4242424242424241"))
    accepted = await _submit(anonymous, session["client_secret"], **_card())

    assert refused.status_code == 402, refused.text
    assert accepted.status_code == 200, accepted.text


async def test_pci_6_4_2_concurrent_submissions_of_one_session_store_one_card(api, anonymous, merchant, services):
    session = await _session(api)
    responses = await asyncio.gather(*(_submit(anonymous, session["client_secret"], **_card()) for _ in range(6)))

    assert sorted(r.status_code for r in responses) == [200, 400, 400, 400, 400, 400]
    assert await _stored(services, merchant.id) == (1, 1)


async def test_pci_6_4_2_a_configured_use_count_is_honoured(app_with):
    async with app_with(card_form={"session_max_uses": 3}) as (api, browser, _):
        session = await _session(api)
        answers = [(await _submit(browser, session["client_secret"], **_card())).status_code for _ in range(5)]

    assert answers == [200, 200, 200, 400, 400]


@pytest.mark.parametrize(
    ("origin", "referer"),
    [
        ("https://evil.example", None),
        ("null", None),
        (None, None),
        (None, "https://evil.example/checkout"),
        ("https://shop.example.evil.example", None),
        ("http://shop.example", None),
        ("https://evil.example", f"{ORIGIN}/checkout"),
    ],
    ids=["evil-origin", "null-origin", "none", "evil-referer", "suffix", "scheme", "origin-wins"],
)
async def test_pci_6_4_2_submission_from_another_origin_is_refused_and_stores_nothing(
    api, anonymous, merchant, services, origin, referer
):
    session = await _session(api)
    headers = {"Referer": referer} if referer is not None else {}
    data = {"client_secret": session["client_secret"], **_card()}
    if origin is not None:
        headers["Origin"] = origin
    response = await anonymous.post("/v1/elements/payment_methods", data=data, headers=headers)

    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "elements_origin_not_allowed"
    assert await _stored(services, merchant.id) == (0, 0)
    # The refusal did not use the session up.
    assert (await _submit(anonymous, session["client_secret"], **_card())).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{"Origin": FORM_ORIGIN}, {"Origin": ORIGIN}, {"Referer": f"{FORM_ORIGIN}/v1/elements/card?session=x"}],
    ids=["form-origin", "merchant-origin", "form-referer"],
)
async def test_submission_from_the_form_or_the_merchants_origin_is_accepted(api, anonymous, headers):
    session = await _session(api)
    data = {"client_secret": session["client_secret"], **_card()}
    response = await anonymous.post("/v1/elements/payment_methods", data=data, headers=headers)

    assert response.status_code == 200, response.text


async def test_pci_6_4_2_bad_client_secrets_from_one_ip_get_a_429(app_with):
    """The issue's probe: 300 made-up secrets. Past the per-IP limit every answer is a 429 with
    Retry-After, before the secret is even looked at."""
    async with app_with(ratelimit={"card_form_per_ip": 20, "card_form_per_ip_window_s": 600}) as (api, browser, _):
        statuses = []
        for n in range(300):
            response = await _submit(browser, f"elements_session_{n:024d}_secret_AAAA", **_card())
            statuses.append(response.status_code)
        last = response
        session = await _session(api)
        good = await _submit(browser, session["client_secret"], **_card())

    assert statuses[:20] == [401] * 20
    assert statuses[20:] == [429] * 280
    assert last.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(last.headers["retry-after"]) <= 600
    assert last.headers["cache-control"] == "no-store"
    # The limit is the address's: a real card from it waits too.
    assert good.status_code == 429


async def test_pci_6_4_2_card_testing_through_one_session_gets_a_429(app_with):
    """Refused cards do not use a session up, so a session could test cards until it expired:
    attempts per session are limited too."""
    async with app_with(ratelimit={"card_form_per_session": 5}) as (api, browser, _):
        session = await _session(api)
        statuses = [
            # The Visa test number with every wrong check digit: each fails Luhn.
            (await _submit(browser, session["client_secret"], **_card(f"424242424242424{(2 + n) % 10}"))).status_code
            for n in range(1, 9)
        ]
        other = await _session(api)
        fresh = await _submit(browser, other["client_secret"], **_card())

    assert statuses[:5] == [402] * 5
    assert statuses[5:] == [429] * 3
    assert fresh.status_code == 200


async def test_used_sessions_are_recorded_with_their_expiry(api, anonymous, merchant, services):
    session = await _session(api)
    await _submit(anonymous, session["client_secret"], **_card())

    async with services.db.read() as conn:
        rows = (
            await conn.execute(sa.select(card_form_sessions).where(card_form_sessions.c.merchant_id == merchant.id))
        ).all()
    assert [(row.id, row.uses) for row in rows] == [(session["id"], 1)]
    expires_at = rows[0].expires_at.replace(tzinfo=rows[0].expires_at.tzinfo or dt.UTC)
    assert expires_at.timestamp() == session["expires_at"]
    assert VISA not in str(rows)
