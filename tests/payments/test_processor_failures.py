"""When the card or the processor says no, or says nothing: declines (402 card_error, Stripe's
codes), the processor's own errors, and timeouts whose outcome the recovery sweep settles.
In every case no money moves and the customer can try again."""

from __future__ import annotations

import datetime as dt
from typing import Any

import httpx
import pytest
from tests.factories import card_payment_method, create_intent

from strongroom.payments import recovery
from strongroom.payments.tables import payment_intents

TIMEOUT_CARD = "4000000000000408"
PROCESSOR_ERROR_CARD = "4000000000005035"

# card number -> (error code, decline code, message), as Stripe answers for its test cards.
DECLINES = {
    "4000000000000002": ("card_declined", "generic_decline", "Your card was declined."),
    "4000000000009995": ("card_declined", "insufficient_funds", "Your card has insufficient funds."),
    "4000000000009987": ("card_declined", "lost_card", "Your card was declined."),
    "4000000000009979": ("card_declined", "stolen_card", "Your card was declined."),
    "4000000000000069": ("expired_card", "expired_card", "Your card has expired."),
    "4000000000000127": ("incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
    "4000000000000119": (
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
}


async def all_events(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = (await api.get("/v1/events", params=params)).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["starting_after"] = page["data"][-1]["id"]


async def retrieve(api: httpx.AsyncClient, intent_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/v1/payment_intents/{intent_id}")).json()
    return body


async def charges_of(api: httpx.AsyncClient, intent_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await api.get("/v1/charges", params={"payment_intent": intent_id})).json()["data"]
    return data


async def confirm(api: httpx.AsyncClient, intent_id: str, payment_method: str | None = None) -> httpx.Response:
    data = {} if payment_method is None else {"payment_method": payment_method}
    return await api.post(f"/v1/payment_intents/{intent_id}/confirm", data=data)


async def nothing_charged(services: Any, merchant_id: str) -> bool:
    return (
        await services.sandbox.count_authorizations(merchant_id) == 0
        and await services.sandbox.captured_minor_by_currency(merchant_id) == {}
    )


# --- declines -------------------------------------------------------------------------------


@pytest.mark.parametrize("number", list(DECLINES))
async def test_declined_card_is_a_402_and_the_intent_awaits_another_payment_method(api, merchant, services, number):
    code, decline_code, message = DECLINES[number]
    pm = await card_payment_method(api, number)
    intent = await create_intent(api, amount=2000)

    response = await confirm(api, intent["id"], pm["id"])

    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["decline_code"], error["message"]) == (
        "card_error",
        code,
        decline_code,
        message,
    )
    assert error["payment_intent"]["id"] == intent["id"]
    after = await retrieve(api, intent["id"])
    assert after["status"] == "requires_payment_method"
    assert (after["amount_received"], after["amount_capturable"]) == (0, 0)
    assert after["payment_method"] is None
    last = after["last_payment_error"]
    assert (last["type"], last["code"], last["decline_code"]) == ("card_error", code, decline_code)
    assert last["payment_method"]["id"] == pm["id"]
    [charge] = await charges_of(api, intent["id"])
    assert charge["id"] == last["charge"] == error["charge"] == after["latest_charge"]
    assert (charge["status"], charge["paid"], charge["captured"], charge["amount_captured"]) == (
        "failed",
        False,
        False,
        0,
    )
    assert (charge["failure_code"], charge["failure_message"]) == (code, message)
    assert charge["outcome"]["reason"] == decline_code
    assert await nothing_charged(services, merchant.id)
    types = [e["type"] for e in await all_events(api)]
    assert {"payment_intent.payment_failed", "charge.failed"} <= set(types)
    assert "payment_intent.succeeded" not in types
    assert "charge.succeeded" not in types


async def test_decline_at_create_with_confirm_reports_the_created_intent(api, merchant, services):
    response = await api.post(
        "/v1/payment_intents",
        data={
            "amount": "2000",
            "currency": "usd",
            "payment_method": "pm_card_chargeDeclinedInsufficientFunds",
            "confirm": "true",
        },
    )

    assert response.status_code == 402
    error = response.json()["error"]
    assert error["decline_code"] == "insufficient_funds"
    intent = await retrieve(api, error["payment_intent"]["id"])
    assert intent["status"] == "requires_payment_method"
    assert intent["last_payment_error"]["decline_code"] == "insufficient_funds"
    assert await nothing_charged(services, merchant.id)


async def test_declined_manual_capture_intent_holds_nothing(api, merchant, services):
    intent = await create_intent(api, capture_method="manual")

    response = await confirm(api, intent["id"], "pm_card_chargeDeclinedStolenCard")

    assert response.status_code == 402
    after = await retrieve(api, intent["id"])
    assert (after["status"], after["amount_capturable"]) == ("requires_payment_method", 0)
    assert await nothing_charged(services, merchant.id)


async def test_retry_with_a_good_card_after_a_decline_succeeds_and_clears_the_error(api, merchant, services):
    intent = await create_intent(api, amount=2000)
    assert (await confirm(api, intent["id"], "pm_card_chargeDeclined")).status_code == 402

    response = await confirm(api, intent["id"], "pm_card_visa")

    assert response.status_code == 200, response.text
    paid = response.json()
    assert (paid["status"], paid["amount_received"], paid["last_payment_error"]) == ("succeeded", 2000, None)
    statuses = sorted(c["status"] for c in await charges_of(api, intent["id"]))
    assert statuses == ["failed", "succeeded"]
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {"usd": 2000}


async def test_declined_intent_must_be_given_a_new_payment_method_to_confirm_again(api, merchant, services):
    intent = await create_intent(api)
    await confirm(api, intent["id"], "pm_card_chargeDeclined")

    response = await confirm(api, intent["id"])

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "payment_method"
    assert len(await charges_of(api, intent["id"])) == 1
    assert await nothing_charged(services, merchant.id)


# --- the processor's own error --------------------------------------------------------------


async def test_processor_error_is_a_402_processing_error_and_nothing_is_charged(api, merchant, services):
    pm = await card_payment_method(api, PROCESSOR_ERROR_CARD)
    intent = await create_intent(api)

    response = await confirm(api, intent["id"], pm["id"])

    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["decline_code"]) == (
        "card_error",
        "processing_error",
        "processing_error",
    )
    after = await retrieve(api, intent["id"])
    assert after["status"] == "requires_payment_method"
    assert after["last_payment_error"]["decline_code"] == "processing_error"
    [charge] = await charges_of(api, intent["id"])
    assert charge["status"] == "failed"
    assert await nothing_charged(services, merchant.id)
    assert await services.sandbox.list_operations(merchant.id) == []


# --- timeouts: outcome unknown --------------------------------------------------------------


async def _timed_out_intent(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    pm = await card_payment_method(api, TIMEOUT_CARD)
    intent = await create_intent(api, **params)
    response = await confirm(api, intent["id"], pm["id"])
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_processor_timeout_leaves_the_intent_processing_and_charges_nothing(api, merchant, services):
    intent = await _timed_out_intent(api)

    assert intent["status"] == "processing"
    assert (intent["amount_received"], intent["amount_capturable"]) == (0, 0)
    assert intent["last_payment_error"] is None
    assert await retrieve(api, intent["id"]) == intent
    assert await charges_of(api, intent["id"]) == []
    assert await nothing_charged(services, merchant.id)


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("confirm", {"payment_method": "pm_card_visa"}),
        ("capture", {}),
        ("cancel", {}),
        ("", {"amount": "3000"}),
    ],
)
async def test_intent_with_an_unknown_outcome_refuses_changes(api, merchant, services, path, data):
    intent = await _timed_out_intent(api)
    events_before = await all_events(api)

    response = await api.post(f"/v1/payment_intents/{intent['id']}" + (f"/{path}" if path else ""), data=data)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "payment_intent_unexpected_state"
    assert await retrieve(api, intent["id"]) == intent
    assert await all_events(api) == events_before
    assert await nothing_charged(services, merchant.id)


async def test_recovery_sweep_fails_a_timed_out_authorization_the_processor_never_recorded(api, merchant, services):
    intent = await _timed_out_intent(api, capture_method="manual")

    await recovery.sweep(services.payments, older_than_s=0)

    after = await retrieve(api, intent["id"])
    assert after["status"] == "requires_payment_method"
    assert after["last_payment_error"]["code"] == "processing_error"
    assert (after["amount_received"], after["amount_capturable"]) == (0, 0)
    [charge] = await charges_of(api, intent["id"])
    assert (charge["status"], charge["amount_captured"]) == ("failed", 0)
    assert await nothing_charged(services, merchant.id)
    types = [e["type"] for e in await all_events(api)]
    assert {"payment_intent.payment_failed", "charge.failed"} <= set(types)
    # Settled: the customer can now pay with another card.
    retried = await confirm(api, intent["id"], "pm_card_visa")
    assert retried.json()["status"] == "requires_capture"
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_recovery_sweep_leaves_recent_unknown_outcomes_alone(api, merchant, services):
    intent = await _timed_out_intent(api)

    await recovery.sweep(services.payments, older_than_s=3600)

    assert await retrieve(api, intent["id"]) == intent
    assert await nothing_charged(services, merchant.id)


@pytest.mark.parametrize("path", ["capture", "cancel"])
async def test_long_unknown_outcome_is_still_not_captured_or_canceled(api, merchant, services, path):
    intent = await _timed_out_intent(api, capture_method="manual")
    # The request that began the authorization is long gone: its lock is stale.
    async with services.db.tx() as conn:
        await conn.execute(
            payment_intents.update()
            .where(payment_intents.c.merchant_id == merchant.id, payment_intents.c.id == intent["id"])
            .values(pending_since=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        )
    events_before = await all_events(api)

    response = await api.post(f"/v1/payment_intents/{intent['id']}/{path}")

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "payment_intent_unexpected_state"
    assert await retrieve(api, intent["id"]) == intent
    assert await all_events(api) == events_before
    assert await nothing_charged(services, merchant.id)
