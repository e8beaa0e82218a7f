"""GET /v1/balance and /v1/balance_transactions: derived from the ledger's entries, exact in zero-,
two- and three-decimal currencies."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.factories import create_intent, paid_intent


async def _get(api: httpx.AsyncClient, path: str, expect: int = 200, **params: Any) -> dict[str, Any]:
    response = await api.get(path, params=params)
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


async def _refund(api: httpx.AsyncClient, intent_id: str, amount: int) -> dict[str, Any]:
    response = await api.post("/v1/refunds", data={"payment_intent": intent_id, "amount": str(amount)})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _pending(balance: dict[str, Any]) -> dict[str, int]:
    return {b["currency"]: b["amount"] for b in balance["pending"]}


def _available(balance: dict[str, Any]) -> dict[str, int]:
    return {b["currency"]: b["amount"] for b in balance["available"]}


async def test_new_merchant_has_an_empty_balance(api):
    balance = await _get(api, "/v1/balance")
    assert balance == {"object": "balance", "available": [], "pending": [], "livemode": False}


@pytest.mark.parametrize(("currency", "amount"), [("usd", 2000), ("jpy", 5000), ("kwd", 12345)])
async def test_balance_after_capture_partial_capture_and_refunds(api, currency, amount):
    automatic = await paid_intent(api, amount=amount, currency=currency)
    manual = await create_intent(
        api, amount=amount, currency=currency, payment_method="pm_card_visa", confirm=True, capture_method="manual"
    )
    assert _pending(await _get(api, "/v1/balance")) == {currency: amount}  # authorized only: no money moved
    partial = amount // 3
    response = await api.post(f"/v1/payment_intents/{manual['id']}/capture", data={"amount_to_capture": partial})
    assert response.status_code == 200, response.text
    assert _pending(await _get(api, "/v1/balance")) == {currency: amount + partial}

    await _refund(api, automatic["id"], 7)
    await _refund(api, manual["id"], partial)
    balance = await _get(api, "/v1/balance")
    # Captures stay pending until they settle; refunds are paid out of available (as at Stripe),
    # which goes negative until then.
    assert _pending(balance) == {currency: amount + partial}
    assert _available(balance) == {currency: -7 - partial}
    assert balance["object"] == "balance"
    assert balance["livemode"] is False


async def test_balance_is_per_currency_and_never_mixes_them(api):
    await paid_intent(api, amount=1000, currency="usd")
    await paid_intent(api, amount=1000, currency="jpy")
    intent = await paid_intent(api, amount=1500, currency="kwd")
    await _refund(api, intent["id"], 1)
    balance = await _get(api, "/v1/balance")
    assert _pending(balance) == {"jpy": 1000, "kwd": 1500, "usd": 1000}
    assert _available(balance) == {"jpy": 0, "kwd": -1, "usd": 0}


async def test_balance_transactions_in_stripe_shape_and_paged(api):
    intent = await paid_intent(api, amount=2000)
    refund = await _refund(api, intent["id"], 500)
    page = await _get(api, "/v1/balance_transactions")
    assert page["object"] == "list"
    assert page["url"] == "/v1/balance_transactions"
    assert page["has_more"] is False
    refund_txn, charge_txn = page["data"]  # newest first
    assert charge_txn["id"].startswith("txn_")
    assert charge_txn["object"] == "balance_transaction"
    assert (charge_txn["type"], charge_txn["amount"], charge_txn["fee"], charge_txn["net"]) == ("charge", 2000, 0, 2000)
    assert (charge_txn["source"], charge_txn["currency"], charge_txn["status"]) == (
        intent["latest_charge"],
        "usd",
        "pending",
    )
    assert isinstance(charge_txn["available_on"], int)
    assert isinstance(charge_txn["created"], int)
    assert (refund_txn["type"], refund_txn["amount"], refund_txn["net"]) == ("refund", -500, -500)
    assert refund_txn["source"] == refund["id"]

    assert await _get(api, f"/v1/balance_transactions/{charge_txn['id']}") == charge_txn
    first = await _get(api, "/v1/balance_transactions", limit=1)
    assert [t["id"] for t in first["data"]] == [refund_txn["id"]]
    assert first["has_more"] is True
    second = await _get(api, "/v1/balance_transactions", limit=1, starting_after=refund_txn["id"])
    assert [t["id"] for t in second["data"]] == [charge_txn["id"]]
    assert second["has_more"] is False
    before = await _get(api, "/v1/balance_transactions", ending_before=charge_txn["id"])
    assert [t["id"] for t in before["data"]] == [refund_txn["id"]]


async def test_unknown_balance_transaction_is_404(api):
    error = (await _get(api, "/v1/balance_transactions/txn_doesnotexist", expect=404))["error"]
    assert (error["code"], error["param"]) == ("resource_missing", "id")


async def test_balance_refuses_unknown_parameters(api):
    error = (await _get(api, "/v1/balance", expect=400, bogus="1"))["error"]
    assert error["param"] == "bogus"
