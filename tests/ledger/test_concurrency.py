"""Issue 5 item 6 and SECURITY.md I5 under races, on PostgreSQL with real concurrent connections.

100 partial refunds of one payment, concurrent manual captures of one authorization, concurrent
confirms of one intent, and capture against cancel, sent at once through the HTTP API
(`asyncio.gather` over httpx.ASGITransport: each request runs on its own pooled connection, so
row locks decide the races); then the 100 refunds again, each sent twice under its own
Idempotency-Key and retried until it has a definitive answer. Whatever the interleaving: never
more refunded than captured, one ledger posting per succeeded refund and one per capture, the
trial balance holds, and `GET /v1/balance` (pending + available) shows captured - refunded.

PostgreSQL only, as in tests/idempotency/test_concurrency_postgres.py: without
STRONGROOM_TEST_DATABASE_URL the module holds no tests (nothing collected, nothing skipped) —
SQLite serialises all writers and cannot race.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections import Counter, defaultdict
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from strongroom.api.http import Services
from strongroom.ledger import service as ledger
from strongroom.ledger.tables import ledger_entries, ledger_transactions
from strongroom.payments.tables import refunds
from tests.conftest import Merchant
from tests.factories import _form

PG_PARAMS = ["postgres"] if os.environ.get("STRONGROOM_TEST_DATABASE_URL") else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)

REFUNDS = 100
CAPTURES = 12
CAPTURED = 10_000
# 100 different amounts (50 to 249 cents, 14,950 in all): together well above what was captured,
# so the race decides which of them fit.
AMOUNTS = [50 + (i * 37) % 200 for i in range(REFUNDS)]
REFUND_REFUSALS = {
    "400 invalid_request_error/amount_too_large",
    "400 invalid_request_error/charge_already_refunded",
}
# Answers a client retries with the same key: the key is busy, or the server shed the request.
# 500 outcome_unknown: cut off mid-way by pool exhaustion; retried with the same key, as the SDKs do.
RETRYABLE = {
    "409 idempotency_error/idempotency_key_in_use",
    "503 api_error/overloaded",
    "500 api_error/outcome_unknown",
}
RETRY_ROUNDS_MAX = 40


def new_key() -> str:
    return "ledger_race_" + secrets.token_hex(12)


async def post(api: httpx.AsyncClient, path: str, data: dict[str, Any], key: str | None = None) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(path, data=_form(data), headers=headers)


def outcome(response: httpx.Response) -> str:
    """`200`, or `<status> <error type>/<code>` for a refusal."""
    if response.status_code == 200:
        return "200"
    error = response.json()["error"]
    return f"{response.status_code} {error['type']}/{error.get('code')}"


async def captured_payment(api: httpx.AsyncClient, amount: int, *, manual: bool = False) -> dict[str, Any]:
    data = {"amount": amount, "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    if manual:
        data["capture_method"] = "manual"
    response = await post(api, "/v1/payment_intents", data)
    assert response.status_code == 200, response.text
    intent: dict[str, Any] = response.json()
    assert intent["status"] == ("requires_capture" if manual else "succeeded")
    return intent


async def postings(services: Services, merchant_id: str, kind: str) -> dict[str, list[int]]:
    """{source id: [amount of each of its `kind` postings]}; a posting's amount is the sum of its
    debits (however many accounts it takes the money from)."""
    e, t = ledger_entries.c, ledger_transactions.c
    query = (
        sa.select(t.source_id, t.id, sa.func.sum(sa.case((e.amount_minor > 0, e.amount_minor), else_=0)))
        .join(ledger_entries, sa.and_(e.merchant_id == t.merchant_id, e.transaction_id == t.id))
        .where(t.merchant_id == merchant_id, t.kind == kind)
        .group_by(t.source_id, t.id)
    )
    found: dict[str, list[int]] = defaultdict(list)
    async with services.db.read() as conn:
        for source_id, _txn, debits in await conn.execute(query):
            found[source_id].append(int(debits))
    return dict(found)


async def refund_rows(services: Services, merchant: Merchant) -> dict[str, tuple[str, int]]:
    query = sa.select(refunds.c.id, refunds.c.status, refunds.c.amount).where(refunds.c.merchant_id == merchant.id)
    async with services.db.read() as conn:
        return {row.id: (row.status, row.amount) for row in await conn.execute(query)}


async def assert_ledger_agrees(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, intent_id: str, captured: int
) -> dict[str, int]:
    """The checks every race ends with; returns the succeeded refunds {id: amount}."""
    rows = await refund_rows(services, merchant)
    assert {status for status, _ in rows.values()} <= {"succeeded"}, rows  # none left pending or failed
    succeeded = {refund_id: amount for refund_id, (_, amount) in rows.items()}
    refunded = sum(succeeded.values())
    assert refunded <= captured

    intent = (await api.get(f"/v1/payment_intents/{intent_id}")).json()
    assert intent["amount_received"] == captured
    charge = (await api.get(f"/v1/charges/{intent['latest_charge']}")).json()
    assert (charge["amount_captured"], charge["amount_refunded"]) == (captured, refunded)
    at_processor = await services.sandbox.list_charges(merchant.id)
    assert [(c.captured_minor, c.refunded_minor) for c in at_processor] == [(captured, refunded)]

    assert await postings(services, merchant.id, "capture") == {intent["latest_charge"]: [captured]}
    assert await postings(services, merchant.id, "refund") == {
        refund_id: [amount] for refund_id, amount in succeeded.items()
    }
    async with services.db.read() as conn:
        report = await ledger.check(conn, merchant_id=merchant.id)
    assert report.ok, report.problems

    balance = (await api.get("/v1/balance")).json()
    pending = {b["currency"]: b["amount"] for b in balance["pending"]}
    available = {b["currency"]: b["amount"] for b in balance["available"]}
    # Captures wait in pending and refunds are paid out of available (which may go negative), as
    # at Stripe: what the merchant is owed is the sum of the two.
    assert pending["usd"] + available["usd"] == captured - refunded, balance
    assert 0 <= pending["usd"] <= captured, balance
    return succeeded


def assert_refusals_were_due(split_by_amount: list[tuple[int, str]], captured: int, refunded: int) -> None:
    """What is left to refund only shrinks, so a refund refused for its amount must not fit even
    into what is left at the end: the race never refused a refund that had room."""
    left = captured - refunded
    for amount, result in split_by_amount:
        if result in REFUND_REFUSALS:
            assert amount > left, (amount, left, result)


async def test_i5_100_concurrent_partial_refunds_never_exceed_captured_and_never_post_twice(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """100 refunds of 50 to 249 (14,950 in all) of a 10,000 payment at once: those that fit
    succeed, each posts once, the rest are refused for their amount and post nothing."""
    assert services.db.dialect == "postgresql"
    intent = await captured_payment(api, CAPTURED)
    responses = await asyncio.gather(
        *(post(api, "/v1/refunds", {"payment_intent": intent["id"], "amount": a}) for a in AMOUNTS)
    )
    split = Counter(outcome(r) for r in responses)
    print(f"\n{REFUNDS} partial refunds ({sum(AMOUNTS)} in all) of {CAPTURED}: {dict(split)}")
    assert set(split) <= {"200", *REFUND_REFUSALS}, split
    answered = {r.json()["id"]: r.json()["amount"] for r in responses if r.status_code == 200}
    assert all(r.json()["status"] == "succeeded" for r in responses if r.status_code == 200)

    succeeded = await assert_ledger_agrees(api, services, merchant, intent["id"], CAPTURED)
    assert succeeded == answered  # every 200 is a refund, and every refund was answered with a 200
    assert_refusals_were_due(list(zip(AMOUNTS, map(outcome, responses), strict=True)), CAPTURED, sum(answered.values()))


async def test_i5_concurrent_manual_captures_capture_once_and_post_once(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """12 partial captures of one authorization of 10,000, each for another amount, at once:
    exactly one captures, with the amount it asked for, and posts once. Then 100 partial refunds
    of that partial capture race: bounded by what was captured, not by what was authorized."""
    intent = await captured_payment(api, CAPTURED, manual=True)
    path = f"/v1/payment_intents/{intent['id']}/capture"
    asked = [3000 + 250 * i for i in range(CAPTURES)]
    responses = await asyncio.gather(*(post(api, path, {"amount_to_capture": a}, key=new_key()) for a in asked))
    split = Counter(outcome(r) for r in responses)
    print(f"\n{CAPTURES} captures of different amounts: {dict(split)}")
    assert split["200"] == 1, split
    assert set(split) <= {
        "200",
        "400 invalid_request_error/payment_intent_unexpected_state",
        "409 invalid_request_error/lock_timeout",
    }, split
    winner_index = next(i for i, r in enumerate(responses) if r.status_code == 200)
    winner = responses[winner_index].json()
    captured = asked[winner_index]
    assert (winner["status"], winner["amount_received"], winner["amount_capturable"]) == ("succeeded", captured, 0)
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {"usd": captured}
    await assert_ledger_agrees(api, services, merchant, intent["id"], captured)

    responses = await asyncio.gather(
        *(post(api, "/v1/refunds", {"payment_intent": intent["id"], "amount": a}) for a in AMOUNTS)
    )
    split = Counter(outcome(r) for r in responses)
    print(f"{REFUNDS} partial refunds ({sum(AMOUNTS)} in all) of the {captured} captured: {dict(split)}")
    assert set(split) <= {"200", *REFUND_REFUSALS}, split
    succeeded = await assert_ledger_agrees(api, services, merchant, intent["id"], captured)
    assert succeeded == {r.json()["id"]: r.json()["amount"] for r in responses if r.status_code == 200}
    assert_refusals_were_due(
        list(zip(AMOUNTS, map(outcome, responses), strict=True)), captured, sum(succeeded.values())
    )


async def send_until_answered(
    api: httpx.AsyncClient, data: dict[str, Any], key: str, first: httpx.Response
) -> list[httpx.Response]:
    """A client's retries: the same request and key again while the answer says to retry."""
    answers = [first]
    for _ in range(RETRY_ROUNDS_MAX):
        if outcome(answers[-1]) not in RETRYABLE:
            return answers
        await asyncio.sleep(0.05)
        answers.append(await post(api, "/v1/refunds", data, key=key))
    raise AssertionError(f"no definitive answer for {key} after {RETRY_ROUNDS_MAX} retries: {outcome(answers[-1])}")


async def test_i5_i1_100_refunds_each_sent_twice_with_its_idempotency_key_post_once(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """The 100 refunds again, each sent twice at once under its own key (200 requests in flight)
    and retried while the answer is 409 (key in use) or 503 (shed): each key refunds at most
    once, its answers agree, and the ledger holds exactly the refunds that happened."""
    intent = await captured_payment(api, CAPTURED)
    requests = [({"payment_intent": intent["id"], "amount": a}, new_key()) for a in AMOUNTS]
    firsts = await asyncio.gather(*(post(api, "/v1/refunds", data, key=key) for data, key in requests * 2))
    print(f"\n{REFUNDS} refunds sent twice, first answers: {dict(Counter(outcome(r) for r in firsts))}")
    retried = await asyncio.gather(
        *(send_until_answered(api, data, key, first) for (data, key), first in zip(requests * 2, firsts, strict=True))
    )

    by_key: dict[str, list[httpx.Response]] = defaultdict(list)
    for (_, key), answers in zip(requests * 2, retried, strict=True):
        assert set(map(outcome, answers[:-1])) <= RETRYABLE
        by_key[key].append(answers[-1])
    final: list[tuple[int, str]] = []
    answered: dict[str, int] = {}
    for data, key in requests:
        pair = by_key[key]
        results = {outcome(r) for r in pair}
        if "200" in results:
            assert results == {"200"}, (key, results)  # one ran, the other replays it
        else:
            # A refusal changed nothing and is not stored: the other copy was judged again, maybe
            # later (amount_too_large then, charge_already_refunded once the charge was used up).
            assert results <= REFUND_REFUSALS, (key, results)
        result = "200" if "200" in results else min(results)
        final.append((data["amount"], result))
        if result == "200":
            assert pair[0].content == pair[1].content  # the one execution, and its replay
            assert [r.headers.get("Idempotent-Replayed") for r in pair].count(None) == 1  # one ran
            answered[pair[0].json()["id"]] = data["amount"]
    print(f"definitive answers per key: {dict(Counter(result for _, result in final))}")

    succeeded = await assert_ledger_agrees(api, services, merchant, intent["id"], CAPTURED)
    assert succeeded == answered
    assert_refusals_were_due(final, CAPTURED, sum(answered.values()))

    # Every key once more, later: a refund is replayed byte for byte; a refusal was not stored
    # (nothing changed), so it is judged again, and refused again. Nothing new is posted.
    again = await asyncio.gather(*(post(api, "/v1/refunds", data, key=key) for data, key in requests))
    for (_, key), response in zip(requests, again, strict=True):
        first = by_key[key][0]
        if first.status_code == 200:
            assert outcome(response) == "200"
        else:  # refused again (the code may differ: the charge is used up by now)
            assert outcome(response) in REFUND_REFUSALS, outcome(response)
        if response.status_code == 200:
            assert (response.content, response.headers["Idempotent-Replayed"]) == (first.content, "true")
    assert await assert_ledger_agrees(api, services, merchant, intent["id"], CAPTURED) == succeeded


async def test_i5_concurrent_confirms_and_capture_against_cancel_post_at_most_once(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """20 confirms of one automatic-capture intent at once capture it once and post once; then,
    5 times, a capture and a cancel of one authorization at once: a capture posts, a cancel
    (void) posts nothing. The ledger holds exactly the captures of the intents that succeeded."""
    created = await post(
        api, "/v1/payment_intents", {"amount": 2500, "currency": "usd", "payment_method": "pm_card_visa"}
    )
    automatic = created.json()["id"]
    path = f"/v1/payment_intents/{automatic}/confirm"
    responses = await asyncio.gather(*(post(api, path, {}, key=new_key()) for _ in range(20)))
    split = Counter(outcome(r) for r in responses)
    print(f"\n20 confirms of one intent: {dict(split)}")
    assert split["200"] == 1, split
    intents = [automatic]
    for _ in range(5):
        manual = await captured_payment(api, 1500, manual=True)
        base = f"/v1/payment_intents/{manual['id']}"
        capture, cancel = await asyncio.gather(
            post(api, f"{base}/capture", {}, key=new_key()), post(api, f"{base}/cancel", {}, key=new_key())
        )
        assert [capture.status_code, cancel.status_code].count(200) == 1, (outcome(capture), outcome(cancel))
        intents.append(manual["id"])

    final = [(await api.get(f"/v1/payment_intents/{i}")).json() for i in intents]
    succeeded = {i["latest_charge"]: i["amount_received"] for i in final if i["status"] == "succeeded"}
    assert final[0]["status"] == "succeeded"
    assert {i["status"] for i in final} <= {"succeeded", "canceled"}
    print(f"capture vs cancel: {Counter(i['status'] for i in final[1:])}")
    assert await postings(services, merchant.id, "capture") == {ch: [amount] for ch, amount in succeeded.items()}
    assert await postings(services, merchant.id, "refund") == {}
    async with services.db.read() as conn:
        report = await ledger.check(conn, merchant_id=merchant.id)
    assert report.ok, report.problems
    balance = (await api.get("/v1/balance")).json()
    owed = sum(b["amount"] for b in [*balance["pending"], *balance["available"]] if b["currency"] == "usd")
    assert owed == sum(succeeded.values())
