"""SECURITY.md I5: every journal transaction sums to zero per currency, entries are immutable (the
database refuses UPDATE and DELETE), and the same source can never post twice."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from strongroom.auth.models import Principal
from strongroom.errors import InvariantError
from strongroom.ledger import service as ledger
from strongroom.ledger.models import Entry
from strongroom.ledger.tables import ledger_entries, ledger_transactions
from tests.factories import create_intent, paid_intent


def _principal(merchant) -> Principal:
    return Principal(merchant_id=merchant.id, livemode=False, key_id="test")


async def _count(services, merchant) -> tuple[int, int]:
    async with services.db.read() as conn:
        txns = await conn.scalar(sa.select(sa.func.count()).where(ledger_transactions.c.merchant_id == merchant.id))
        entries = await conn.scalar(sa.select(sa.func.count()).where(ledger_entries.c.merchant_id == merchant.id))
    return int(txns or 0), int(entries or 0)


async def test_i5_every_journal_transaction_sums_to_zero_per_currency(api, services, merchant):
    for currency in ("usd", "jpy", "kwd"):
        intent = await paid_intent(api, amount=5000, currency=currency)
        response = await api.post("/v1/refunds", data={"payment_intent": intent["id"], "amount": "1234"})
        assert response.status_code == 200, response.text
    manual = await create_intent(api, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    response = await api.post(f"/v1/payment_intents/{manual['id']}/capture", data={"amount_to_capture": "700"})
    assert response.status_code == 200, response.text

    async with services.db.read() as conn:
        rows = await conn.execute(
            sa.select(
                ledger_entries.c.transaction_id,
                ledger_entries.c.currency,
                sa.func.sum(ledger_entries.c.amount_minor),
                sa.func.count(),
            )
            .where(ledger_entries.c.merchant_id == merchant.id)
            .group_by(ledger_entries.c.transaction_id, ledger_entries.c.currency)
        )
        sums = list(rows)
        report = await ledger.check(conn, merchant_id=merchant.id)
    assert len(sums) == 7  # 3 captures, 3 refunds, 1 manual capture; one currency each
    assert all(total == 0 and lines == 2 for _, _, total, lines in sums)
    assert report.ok, report.problems
    assert report.transactions == 7

    # An unbalanced posting is refused before anything is written.
    principal = _principal(merchant)
    before = await _count(services, merchant)
    with pytest.raises(InvariantError, match="does not balance"):
        async with services.db.tx() as conn:
            await ledger.post(
                conn,
                principal,
                "charge",
                "ch_unbalanced",
                "capture",
                "usd",
                [Entry("processor_receivable:sandbox", 100), Entry("merchant_pending", -99)],
            )
    with pytest.raises(InvariantError, match="chart of accounts"):
        async with services.db.tx() as conn:
            await ledger.post(
                conn, principal, "charge", "ch_x", "capture", "usd", [Entry("cash", 1), Entry("merchant_pending", -1)]
            )
    assert await _count(services, merchant) == before


async def test_i5_database_refuses_update_and_delete_of_entries(api, services, merchant):
    await paid_intent(api, amount=2500)
    statements = [
        "UPDATE ledger_entries SET amount_minor = amount_minor + 1 WHERE merchant_id = :m",
        "UPDATE ledger_entries SET account = 'merchant_available' WHERE merchant_id = :m",
        "DELETE FROM ledger_entries WHERE merchant_id = :m",
        "UPDATE ledger_transactions SET currency = 'eur' WHERE merchant_id = :m",
        "DELETE FROM ledger_transactions WHERE merchant_id = :m",
    ]
    for statement in statements:
        with pytest.raises(sa.exc.DBAPIError, match="immutable"):
            async with services.db.tx() as conn:
                await conn.execute(sa.text(statement), {"m": merchant.id})
    async with services.db.read() as conn:
        amounts = sorted(
            (
                await conn.execute(
                    sa.select(ledger_entries.c.amount_minor).where(ledger_entries.c.merchant_id == merchant.id)
                )
            )
            .scalars()
            .all()
        )
    assert amounts == [-2500, 2500]
    assert await _count(services, merchant) == (1, 2)


async def test_same_source_can_never_post_twice(api, services, merchant):
    intent = await paid_intent(api, amount=900)
    principal = _principal(merchant)
    entries = [Entry("processor_receivable:sandbox", 900), Entry("merchant_pending", -900)]
    with pytest.raises(sa.exc.IntegrityError):
        async with services.db.tx() as conn:
            await ledger.post(conn, principal, "charge", intent["latest_charge"], "capture", "usd", entries)
    assert await _count(services, merchant) == (1, 2)


async def test_authorization_and_void_post_nothing(api, services, merchant):
    intent = await create_intent(api, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    assert await _count(services, merchant) == (0, 0)
    response = await api.post(f"/v1/payment_intents/{intent['id']}/cancel")
    assert response.status_code == 200, response.text
    assert await _count(services, merchant) == (0, 0)
    await create_intent(api, expect=402, payment_method="pm_card_chargeDeclinedInsufficientFunds", confirm=True)
    assert await _count(services, merchant) == (0, 0)


async def test_merchant_pending_can_never_go_negative(api, services, merchant):
    await paid_intent(api, amount=1000)
    principal = _principal(merchant)
    entries = [Entry("merchant_pending", 1001), Entry("processor_receivable:sandbox", -1001)]
    with pytest.raises(InvariantError, match="negative"):
        async with services.db.tx() as conn:
            await ledger.post(conn, principal, "refund", "re_toomuch", "refund", "usd", entries)
    assert await _count(services, merchant) == (1, 2)


async def test_a_refund_is_paid_out_of_the_available_balance_as_at_stripe(api, merchant):
    intent = await paid_intent(api, amount=1000)
    response = await api.post("/v1/refunds", data={"payment_intent": intent["id"], "amount": "400"})
    assert response.status_code == 200, response.text
    balance = (await api.get("/v1/balance")).json()
    assert balance["pending"] == [{"amount": 1000, "currency": "usd"}]
    # The charge has not settled yet: the merchant owes the refund until it does.
    assert balance["available"] == [{"amount": -400, "currency": "usd"}]
