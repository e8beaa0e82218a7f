"""Races on PostgreSQL with real concurrent connections (SECURITY.md I1, I3; ARCHITECTURE "Testing").

Many requests are sent at once through the in-process ASGI app (`asyncio.gather` over
httpx.ASGITransport): each runs on its own pooled connection (the app's pool allows 20), so the
database sees genuinely concurrent transactions and row locks decide the races.

PostgreSQL only: the `database_url` parameter list is built at collection time from
STRONGROOM_TEST_DATABASE_URL. Without it the module holds no tests at all (`__test__` is false:
nothing is collected, so nothing is skipped) — SQLite serialises all writers and cannot race.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import Counter
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tests.conftest import Merchant
from tests.factories import _form, card_payment_method

from strongroom.api.http import Services
from strongroom.connectors.sandbox.tables import sandbox_charges
from strongroom.payments.tables import customers, payment_intents, refunds

PG_PARAMS = ["postgres"] if os.environ.get("STRONGROOM_TEST_DATABASE_URL") else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)

CONCURRENCY = 50
PAID = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}


def new_key() -> str:
    return "race_" + secrets.token_hex(12)


async def post(api: httpx.AsyncClient, path: str, data: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(path, data=_form(data), headers=headers)


async def count(services: Services, table: sa.Table, merchant_id: str, *where: Any) -> int:
    query = sa.select(sa.func.count()).select_from(table).where(table.c.merchant_id == merchant_id, *where)
    async with services.db.read() as conn:
        return int((await conn.execute(query)).scalar_one())


def outcome(response: httpx.Response) -> str:
    """`200`, or `<status> <error type>/<code>` for a refusal."""
    if response.status_code == 200:
        return "200"
    error = response.json()["error"]
    return f"{response.status_code} {error['type']}/{error.get('code')}"


async def payment(api: httpx.AsyncClient, card: str) -> dict[str, Any]:
    """A test alias (its key claimed on its own first) or a stored card (its key claimed in the
    payment's first commit: idempotency.deferred)."""
    if card == "alias":
        return PAID
    return {**PAID, "payment_method": (await card_payment_method(api))["id"]}


CARDS = pytest.mark.parametrize("card", ["alias", "stored"])


async def test_database_is_postgresql(services: Services) -> None:
    assert services.db.dialect == "postgresql"


@CARDS
async def test_i1_concurrent_identical_requests_one_payment_others_409(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, card: str
) -> None:
    """50 identical create+confirm POSTs under one Idempotency-Key at once: one payment. Each
    answer is the payment (200, the same bytes) or 409 idempotency_error while it runs."""
    key = new_key()
    data = await payment(api, card)
    responses = await asyncio.gather(*(post(api, "/v1/payment_intents", data, key=key) for _ in range(CONCURRENCY)))
    split = Counter(outcome(r) for r in responses)
    print(f"\n50 identical POSTs, one key: {dict(split)}")
    assert set(split) <= {"200", "409 idempotency_error/idempotency_key_in_use"}, split
    ok = [r for r in responses if r.status_code == 200]
    assert ok, split
    assert len({r.content for r in ok}) == 1  # the original and every replay: the same bytes
    originals = [r for r in ok if "Idempotent-Replayed" not in r.headers]
    assert len(originals) == 1  # exactly one request executed
    for conflict in (r for r in responses if r.status_code == 409):
        assert int(conflict.headers["Retry-After"]) >= 1
    body = ok[0].json()
    assert body["status"] == "succeeded"

    assert await count(services, payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    retry = await post(api, "/v1/payment_intents", data, key=key)
    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.content == originals[0].content


@CARDS
async def test_i1_staggered_identical_requests_see_409_then_replays(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, card: str
) -> None:
    """The same race with arrivals spread over ~0.5 s: requests that come while the payment runs
    get 409, those that come after it committed get the stored response (a replay)."""
    key = new_key()
    data = await payment(api, card)

    async def late(delay_s: float) -> httpx.Response:
        await asyncio.sleep(delay_s)
        return await post(api, "/v1/payment_intents", data, key=key)

    responses = await asyncio.gather(*(late(i * 0.01) for i in range(CONCURRENCY)))
    split = Counter(outcome(r) for r in responses)
    replays = sum(1 for r in responses if r.headers.get("Idempotent-Replayed") == "true")
    print(f"\n50 staggered POSTs, one key: {dict(split)} ({replays} of the 200s are replays)")
    assert set(split) <= {"200", "409 idempotency_error/idempotency_key_in_use"}, split
    ok = [r for r in responses if r.status_code == 200]
    assert len({r.content for r in ok}) == 1
    assert len([r for r in ok if "Idempotent-Replayed" not in r.headers]) == 1
    assert await count(services, payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_i1_concurrent_identical_customer_creates_one_customer(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:

    key = new_key()
    data = {"email": "race@example.com"}
    responses = await asyncio.gather(*(post(api, "/v1/customers", data, key=key) for _ in range(CONCURRENCY)))
    split = Counter(outcome(r) for r in responses)
    assert set(split) <= {"200", "409 idempotency_error/idempotency_key_in_use"}, split
    assert len({r.content for r in responses if r.status_code == 200}) == 1
    assert await count(services, customers, merchant.id) == 1


async def test_i3_concurrent_confirms_with_different_keys_authorize_once(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """50 confirms of one intent, each under its own key: the intent's row lock lets one begin
    the authorization; the rest see it processing or succeeded and are refused."""
    created = await post(
        api, "/v1/payment_intents", {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa"}
    )
    intent_id = created.json()["id"]
    path = f"/v1/payment_intents/{intent_id}/confirm"
    responses = await asyncio.gather(*(post(api, path, {}, key=new_key()) for _ in range(CONCURRENCY)))
    split = Counter(outcome(r) for r in responses)
    print(f"\n50 confirms, different keys: {dict(split)}")
    assert split["200"] == 1, split
    allowed = {
        "200",
        "400 invalid_request_error/payment_intent_unexpected_state",
        "409 invalid_request_error/lock_timeout",
    }
    assert set(split) <= allowed, split
    winner = next(r for r in responses if r.status_code == 200).json()
    assert winner["status"] == "succeeded"
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    final = (await api.get(f"/v1/payment_intents/{intent_id}")).json()
    assert final["status"] == "succeeded"
    assert final["latest_charge"] == winner["latest_charge"]


async def test_i3_concurrent_partial_refunds_never_exceed_captured(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """30 refunds of 100 on a 1000 payment at once: exactly 10 succeed, 1000 refunded, never more."""
    intent = (await post(api, "/v1/payment_intents", {**PAID, "amount": "1000"})).json()
    assert intent["status"] == "succeeded"
    data = {"payment_intent": intent["id"], "amount": "100"}
    responses = await asyncio.gather(*(post(api, "/v1/refunds", data, key=new_key()) for _ in range(30)))
    split = Counter(outcome(r) for r in responses)
    print(f"\n30 partial refunds of 100 on 1000: {dict(split)}")
    assert split["200"] == 10, split
    assert set(split) <= {
        "200",
        "400 invalid_request_error/amount_too_large",
        "400 invalid_request_error/charge_already_refunded",
    }, split
    assert all(r.json()["status"] == "succeeded" for r in responses if r.status_code == 200)

    charge = (await api.get(f"/v1/charges/{intent['latest_charge']}")).json()
    assert charge["amount_refunded"] == 1000
    assert charge["refunded"] is True
    async with services.db.read() as conn:
        refunded = await conn.scalar(
            sa.select(sa.func.sum(refunds.c.amount)).where(
                refunds.c.merchant_id == merchant.id, refunds.c.status == "succeeded"
            )
        )
        at_processor = await conn.scalar(
            sa.select(sa.func.sum(sandbox_charges.c.refunded_minor)).where(sandbox_charges.c.merchant_id == merchant.id)
        )
    assert refunded == 1000
    assert at_processor == 1000
    assert await count(services, refunds, merchant.id) == 10
    extra = await post(api, "/v1/refunds", data, key=new_key())
    assert extra.status_code == 400


async def test_i3_concurrent_capture_and_cancel_exactly_one_wins(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    rounds = 10
    winners: Counter[str] = Counter()
    for _ in range(rounds):
        intent = (await post(api, "/v1/payment_intents", {**PAID, "capture_method": "manual"})).json()
        assert intent["status"] == "requires_capture"
        base = f"/v1/payment_intents/{intent['id']}"
        capture, cancel = await asyncio.gather(
            post(api, f"{base}/capture", {}, key=new_key()), post(api, f"{base}/cancel", {}, key=new_key())
        )
        ok = [r for r in (capture, cancel) if r.status_code == 200]
        assert len(ok) == 1, (outcome(capture), outcome(cancel))
        loser = cancel if ok[0] is capture else capture
        assert outcome(loser) in {
            "400 invalid_request_error/payment_intent_unexpected_state",
            "409 invalid_request_error/lock_timeout",
        }, outcome(loser)
        final = (await api.get(base)).json()
        if ok[0] is capture:
            winners["capture"] += 1
            assert final["status"] == "succeeded"
            assert final["amount_received"] == 2000
        else:
            winners["cancel"] += 1
            assert final["status"] == "canceled"
            assert final["amount_received"] == 0
        assert ok[0].json()["status"] == final["status"]
    print(f"\ncapture vs cancel over {rounds} rounds: {dict(winners)}")
    async with services.db.read() as conn:
        states = Counter(
            (
                await conn.execute(
                    sa.select(sandbox_charges.c.status).where(sandbox_charges.c.merchant_id == merchant.id)
                )
            )
            .scalars()
            .all()
        )
    assert states == Counter({"captured": winners["capture"], "voided": winners["cancel"]})
