"""Payment intents through the HTTP API, as a merchant (or the stripe SDK) sees them: confirm
flows, automatic and manual capture, cancel, 3-D Secure, amounts and currencies, and the state
machine's refusals (400 `payment_intent_unexpected_state`, and nothing changes).

Declines, timeouts and processor errors: `test_processor_failures.py`. Refunds: `test_refunds.py`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent, paid_intent

from strongroom.connectors.sandbox.processor import ChargeStatus

THREE_DS_CARD = "4000002500003155"
DECLINE_CARD = "4000000000000002"


# --- helpers --------------------------------------------------------------------------------


async def all_events(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = (await api.get("/v1/events", params=params)).json()
        events += page["data"]
        if not page["has_more"]:
            return events
        params["starting_after"] = page["data"][-1]["id"]


async def event_types_for(api: httpx.AsyncClient, object_id: str) -> list[str]:
    """Types of the events about one object, oldest first."""
    return [e["type"] for e in reversed(await all_events(api)) if e["data"]["object"]["id"] == object_id]


async def retrieve(api: httpx.AsyncClient, intent_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/payment_intents/{intent_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def charges_of(api: httpx.AsyncClient, intent_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await api.get("/v1/charges", params={"payment_intent": intent_id})).json()["data"]
    return data


async def snapshot(api: httpx.AsyncClient, intent_id: str) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    return {
        "intent": await retrieve(api, intent_id),
        "charges": await charges_of(api, intent_id),
        "events": [e["id"] for e in await all_events(api)],
    }


async def post(api: httpx.AsyncClient, path: str, **data: Any) -> httpx.Response:
    return await api.post(path, data={k: str(v) for k, v in data.items()})


async def confirm(api: httpx.AsyncClient, intent_id: str, **data: Any) -> httpx.Response:
    return await post(api, f"/v1/payment_intents/{intent_id}/confirm", **data)


async def manual_intent(api: httpx.AsyncClient, amount: int = 2000) -> dict[str, Any]:
    intent = await paid_intent(api, amount=amount, capture_method="manual")
    assert intent["status"] == "requires_capture", intent
    return intent


async def three_ds_intent(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    pm = await card_payment_method(api, THREE_DS_CARD)
    intent = await create_intent(api, payment_method=pm["id"], confirm=True, **params)
    assert intent["status"] == "requires_action", intent
    return intent


def three_ds_form(intent: dict[str, Any]) -> tuple[str, str]:
    """The path the customer's browser is sent to, and the token in its query."""
    url = urlsplit(intent["next_action"]["redirect_to_url"]["url"])
    return url.path, parse_qs(url.query)["token"][0]


async def processor_counts(services: Any, merchant_id: str) -> tuple[int, int]:
    """(successful authorizations, captured ones) as the processor recorded them."""
    return (
        await services.sandbox.count_authorizations(merchant_id),
        await services.sandbox.count_captured_authorizations(merchant_id),
    )


# --- confirm flows --------------------------------------------------------------------------


async def test_create_then_confirm_with_a_payment_method_captures_the_full_amount(api, merchant, services):
    intent = await create_intent(api, amount=2000, currency="usd")
    assert intent["status"] == "requires_payment_method"
    assert intent["amount_received"] == 0

    response = await confirm(api, intent["id"], payment_method="pm_card_visa")

    assert response.status_code == 200, response.text
    confirmed = response.json()
    assert confirmed["status"] == "succeeded"
    assert (confirmed["amount_received"], confirmed["amount_capturable"]) == (2000, 0)
    assert confirmed["last_payment_error"] is None
    [charge] = await charges_of(api, intent["id"])
    assert charge["id"] == confirmed["latest_charge"]
    assert (charge["status"], charge["paid"], charge["captured"], charge["amount_captured"]) == (
        "succeeded",
        True,
        True,
        2000,
    )
    assert await retrieve(api, intent["id"]) == confirmed
    assert await event_types_for(api, intent["id"]) == ["payment_intent.created", "payment_intent.succeeded"]
    assert "charge.succeeded" in [e["type"] for e in await all_events(api)]
    assert await processor_counts(services, merchant.id) == (1, 1)
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {"usd": 2000}


async def test_create_with_a_payment_method_then_confirm_without_one_succeeds(api):
    pm = await card_payment_method(api)
    intent = await create_intent(api, payment_method=pm["id"])
    assert intent["status"] == "requires_confirmation"
    assert intent["payment_method"] == pm["id"]

    response = await confirm(api, intent["id"])

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.json()["payment_method"] == pm["id"]


async def test_confirm_without_any_payment_method_is_refused_naming_payment_method(api, merchant, services):
    intent = await create_intent(api)
    before = await snapshot(api, intent["id"])

    response = await confirm(api, intent["id"])

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "payment_method"
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == (0, 0)


async def test_confirm_true_at_create_pays_in_one_request(api, merchant, services):
    intent = await create_intent(api, amount=1234, payment_method="pm_card_mastercard", confirm=True)

    assert intent["status"] == "succeeded"
    assert intent["amount_received"] == 1234
    assert await processor_counts(services, merchant.id) == (1, 1)


async def test_confirm_true_at_create_without_a_payment_method_is_refused_and_creates_nothing(api):
    body = await create_intent(api, expect=400, confirm=True)

    assert body["error"]["param"] == "payment_method"
    assert (await api.get("/v1/payment_intents")).json()["data"] == []
    assert await all_events(api) == []


async def test_confirm_with_another_payment_method_replaces_the_one_set_at_create(api):
    first = await card_payment_method(api, DECLINE_CARD)
    second = await card_payment_method(api, "5555555555554444")
    intent = await create_intent(api, payment_method=first["id"])

    response = await confirm(api, intent["id"], payment_method=second["id"])

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.json()["payment_method"] == second["id"]


async def test_confirm_with_an_unknown_payment_method_is_a_404_and_changes_nothing(api):
    intent = await create_intent(api)
    before = await snapshot(api, intent["id"])

    response = await confirm(api, intent["id"], payment_method="pm_doesnotexist")

    assert response.status_code == 404
    assert response.json()["error"]["param"] == "payment_method"
    assert await snapshot(api, intent["id"]) == before


# --- manual capture -------------------------------------------------------------------------


async def test_manual_capture_holds_the_amount_until_captured(api, merchant, services):
    intent = await manual_intent(api, amount=2000)
    assert (intent["amount_capturable"], intent["amount_received"]) == (2000, 0)
    [charge] = await charges_of(api, intent["id"])
    assert (charge["captured"], charge["amount_captured"]) == (False, 0)
    assert await processor_counts(services, merchant.id) == (1, 0)

    response = await post(api, f"/v1/payment_intents/{intent['id']}/capture")

    assert response.status_code == 200, response.text
    captured = response.json()
    assert captured["status"] == "succeeded"
    assert (captured["amount_received"], captured["amount_capturable"]) == (2000, 0)
    [charge] = await charges_of(api, intent["id"])
    assert (charge["captured"], charge["amount_captured"]) == (True, 2000)
    assert await processor_counts(services, merchant.id) == (1, 1)
    assert await event_types_for(api, intent["id"]) == [
        "payment_intent.created",
        "payment_intent.amount_capturable_updated",
        "payment_intent.succeeded",
    ]
    assert "charge.captured" in [e["type"] for e in await all_events(api)]


async def test_partial_capture_releases_the_rest_and_succeeds(api, merchant, services):
    intent = await manual_intent(api, amount=2000)

    response = await post(api, f"/v1/payment_intents/{intent['id']}/capture", amount_to_capture=1500)

    assert response.status_code == 200, response.text
    captured = response.json()
    assert captured["status"] == "succeeded"
    assert (captured["amount"], captured["amount_received"], captured["amount_capturable"]) == (2000, 1500, 0)
    [charge] = await charges_of(api, intent["id"])
    assert charge["amount_captured"] == 1500
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {"usd": 1500}


@pytest.mark.parametrize("amount_to_capture", [2001, 99999999])
async def test_capture_above_the_capturable_amount_is_refused_and_changes_nothing(
    api, merchant, services, amount_to_capture
):
    intent = await manual_intent(api, amount=2000)
    before = await snapshot(api, intent["id"])

    response = await post(api, f"/v1/payment_intents/{intent['id']}/capture", amount_to_capture=amount_to_capture)

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "amount_to_capture"
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == (1, 0)


@pytest.mark.parametrize("amount_to_capture", ["0", "-5", "12.5", "abc"])
async def test_capture_of_an_invalid_amount_is_refused_and_changes_nothing(api, amount_to_capture):
    intent = await manual_intent(api)
    before = await snapshot(api, intent["id"])

    response = await post(api, f"/v1/payment_intents/{intent['id']}/capture", amount_to_capture=amount_to_capture)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "amount_to_capture"
    assert await snapshot(api, intent["id"]) == before


# --- cancel ---------------------------------------------------------------------------------


async def _intent_in(api: httpx.AsyncClient, status: str) -> dict[str, Any]:
    if status == "requires_payment_method":
        intent = await create_intent(api)
    elif status == "requires_confirmation":
        intent = await create_intent(api, payment_method="pm_card_visa")
    elif status == "requires_action":
        intent = await three_ds_intent(api)
    elif status == "requires_capture":
        intent = await manual_intent(api)
    elif status == "succeeded":
        intent = await paid_intent(api)
    else:
        intent = await create_intent(api)
        intent = (await post(api, f"/v1/payment_intents/{intent['id']}/cancel")).json()
    assert intent["status"] == status, intent
    return intent


@pytest.mark.parametrize(
    "status", ["requires_payment_method", "requires_confirmation", "requires_action", "requires_capture"]
)
async def test_cancel_from_each_cancelable_status_cancels_with_the_reason(api, status):
    intent = await _intent_in(api, status)

    response = await post(api, f"/v1/payment_intents/{intent['id']}/cancel", cancellation_reason="abandoned")

    assert response.status_code == 200, response.text
    canceled = response.json()
    assert canceled["status"] == "canceled"
    assert canceled["cancellation_reason"] == "abandoned"
    assert canceled["canceled_at"] is not None
    assert (canceled["amount_capturable"], canceled["amount_received"]) == (0, 0)
    assert canceled["next_action"] is None
    assert await retrieve(api, intent["id"]) == canceled
    assert (await event_types_for(api, intent["id"]))[-1] == "payment_intent.canceled"


async def test_cancel_of_an_authorized_payment_voids_it_and_refunds_its_charge(api, merchant, services):
    intent = await manual_intent(api, amount=2000)

    response = await post(api, f"/v1/payment_intents/{intent['id']}/cancel", cancellation_reason="duplicate")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "canceled"
    assert response.json()["cancellation_reason"] == "duplicate"
    [charge] = await charges_of(api, intent["id"])
    assert (charge["refunded"], charge["amount_refunded"], charge["amount_captured"]) == (True, 2000, 0)
    [processor_charge] = await services.sandbox.list_charges(merchant.id)
    assert (processor_charge.status, processor_charge.captured_minor) == (ChargeStatus.VOIDED, 0)
    assert "charge.refunded" in [e["type"] for e in await all_events(api)]


async def test_cancel_without_a_reason_leaves_cancellation_reason_empty(api):
    intent = await create_intent(api)

    canceled = (await post(api, f"/v1/payment_intents/{intent['id']}/cancel")).json()

    assert canceled["status"] == "canceled"
    assert canceled["cancellation_reason"] is None


async def test_cancel_with_an_unknown_reason_is_refused_and_changes_nothing(api):
    intent = await create_intent(api)
    before = await snapshot(api, intent["id"])

    response = await post(api, f"/v1/payment_intents/{intent['id']}/cancel", cancellation_reason="bored")

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "cancellation_reason"
    assert await snapshot(api, intent["id"]) == before


# --- refused transitions --------------------------------------------------------------------

INVALID_TRANSITIONS = [
    ("succeeded", "capture", {}),
    ("requires_payment_method", "capture", {}),
    ("requires_confirmation", "capture", {}),
    ("requires_action", "capture", {}),
    ("canceled", "capture", {}),
    ("succeeded", "confirm", {"payment_method": "pm_card_visa"}),
    ("canceled", "confirm", {"payment_method": "pm_card_visa"}),
    ("requires_capture", "confirm", {}),
    ("succeeded", "cancel", {}),
    ("canceled", "cancel", {}),
    ("succeeded", "update", {"amount": 3000}),
    ("succeeded", "update", {"currency": "eur"}),
    ("canceled", "update", {"amount": 3000}),
    ("requires_capture", "update", {"amount": 1000}),
    ("requires_action", "update", {"amount": 1000}),
]


@pytest.mark.parametrize(("status", "operation", "params"), INVALID_TRANSITIONS)
async def test_operation_not_allowed_in_the_status_is_refused_and_changes_nothing(
    api, merchant, services, status, operation, params
):
    intent = await _intent_in(api, status)
    before = await snapshot(api, intent["id"])
    authorizations = await processor_counts(services, merchant.id)
    path = f"/v1/payment_intents/{intent['id']}" + ("" if operation == "update" else f"/{operation}")

    response = await post(api, path, **params)

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "payment_intent_unexpected_state")
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == authorizations


async def test_unknown_intent_is_a_404(api):
    response = await confirm(api, "pi_doesnotexist", payment_method="pm_card_visa")

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "resource_missing"


async def test_another_merchants_intent_is_a_404_and_stays_untouched(api, app, services):
    other = await new_merchant(services, "Other merchant")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as owner:
        theirs = await create_intent(owner, payment_method="pm_card_visa")
        before = await snapshot(owner, theirs["id"])

        assert (await api.get(f"/v1/payment_intents/{theirs['id']}")).status_code == 404
        assert (await confirm(api, theirs["id"])).status_code == 404
        assert (await post(api, f"/v1/payment_intents/{theirs['id']}/cancel")).status_code == 404
        assert await snapshot(owner, theirs["id"]) == before


# --- update ---------------------------------------------------------------------------------


async def test_update_changes_amount_currency_and_merges_metadata_before_confirmation(api):
    intent = await create_intent(api, amount=2000, currency="usd", metadata={"order": "6735", "note": "x"})

    response = await post(
        api, f"/v1/payment_intents/{intent['id']}", amount=5000, currency="jpy", **{"metadata[note]": ""}
    )

    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["amount"], updated["currency"], updated["status"]) == (5000, "jpy", "requires_payment_method")
    assert updated["metadata"] == {"order": "6735"}
    paid = (await confirm(api, intent["id"], payment_method="pm_card_visa")).json()
    assert (paid["status"], paid["amount_received"], paid["currency"]) == ("succeeded", 5000, "jpy")


async def test_update_with_a_payment_method_makes_the_intent_ready_to_confirm(api):
    intent = await create_intent(api)

    updated = (await post(api, f"/v1/payment_intents/{intent['id']}", payment_method="pm_card_visa")).json()

    assert updated["status"] == "requires_confirmation"
    assert (await confirm(api, intent["id"])).json()["status"] == "succeeded"


async def test_update_of_metadata_is_allowed_while_authentication_is_pending(api):
    intent = await three_ds_intent(api)

    response = await post(api, f"/v1/payment_intents/{intent['id']}", **{"metadata[step]": "3ds"})

    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"step": "3ds"}
    assert response.json()["status"] == "requires_action"


# --- 3-D Secure -----------------------------------------------------------------------------


async def test_three_d_secure_card_requires_action_with_a_redirect_url(api, merchant, services):
    intent = await three_ds_intent(api)

    redirect = intent["next_action"]["redirect_to_url"]
    assert intent["next_action"]["type"] == "redirect_to_url"
    assert urlsplit(redirect["url"]).path == f"/v1/sandbox/3ds/{merchant.id}/{intent['id']}"
    assert (intent["amount_received"], intent["amount_capturable"]) == (0, 0)
    assert await processor_counts(services, merchant.id) == (0, 0)
    assert "payment_intent.requires_action" in await event_types_for(api, intent["id"])


@pytest.mark.parametrize(
    ("capture_method", "final_status"), [("automatic", "succeeded"), ("manual", "requires_capture")]
)
async def test_completed_authentication_authorizes_the_payment(
    api, anonymous, merchant, services, capture_method, final_status
):
    intent = await three_ds_intent(api, amount=4200, capture_method=capture_method)
    path, token = three_ds_form(intent)

    response = await anonymous.post(path, data={"token": token, "result": "succeeded"})

    assert response.status_code == 200, response.text
    after = await retrieve(api, intent["id"])
    assert after["status"] == final_status
    assert after["next_action"] is None
    assert after["last_payment_error"] is None
    if final_status == "succeeded":
        assert (after["amount_received"], after["amount_capturable"]) == (4200, 0)
        assert await processor_counts(services, merchant.id) == (1, 1)
    else:
        assert (after["amount_received"], after["amount_capturable"]) == (0, 4200)
        assert await processor_counts(services, merchant.id) == (1, 0)
    [charge] = await charges_of(api, intent["id"])
    assert charge["status"] == "succeeded"


async def test_failed_authentication_returns_the_intent_to_requires_payment_method(api, anonymous, merchant, services):
    intent = await three_ds_intent(api)
    path, token = three_ds_form(intent)

    response = await anonymous.post(path, data={"token": token, "result": "failed"})

    assert response.status_code == 200, response.text
    after = await retrieve(api, intent["id"])
    assert after["status"] == "requires_payment_method"
    assert after["last_payment_error"]["code"] == "payment_intent_authentication_failure"
    assert after["last_payment_error"]["type"] == "card_error"
    assert after["next_action"] is None
    assert await processor_counts(services, merchant.id) == (0, 0)
    assert (await event_types_for(api, intent["id"]))[-1] == "payment_intent.payment_failed"
    # The customer may try again with another card.
    retried = await confirm(api, intent["id"], payment_method="pm_card_visa")
    assert retried.json()["status"] == "succeeded"


@pytest.mark.parametrize("token", ["wrong", ""])
async def test_authentication_with_a_wrong_token_is_a_404_and_changes_nothing(
    api, anonymous, merchant, services, token
):
    intent = await three_ds_intent(api)
    path, _ = three_ds_form(intent)
    before = await snapshot(api, intent["id"])

    response = await anonymous.post(path, data={"token": token, "result": "succeeded"})

    assert response.status_code == 404
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == (0, 0)


async def test_authentication_token_works_only_once(api, anonymous, merchant, services):
    intent = await three_ds_intent(api)
    path, token = three_ds_form(intent)
    assert (await anonymous.post(path, data={"token": token, "result": "succeeded"})).status_code == 200
    before = await snapshot(api, intent["id"])

    replay = await anonymous.post(path, data={"token": token, "result": "failed"})

    assert replay.status_code == 404
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == (1, 1)


async def test_authentication_page_is_html_with_a_content_security_policy(api, anonymous):
    intent = await three_ds_intent(api)
    path, token = three_ds_form(intent)

    response = await anonymous.get(path, params={"token": token})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert token in response.text
    assert (await retrieve(api, intent["id"]))["status"] == "requires_action"


async def test_canceled_intent_cannot_be_authenticated_afterwards(api, anonymous, merchant, services):
    intent = await three_ds_intent(api)
    path, token = three_ds_form(intent)
    await post(api, f"/v1/payment_intents/{intent['id']}/cancel")
    before = await snapshot(api, intent["id"])

    response = await anonymous.post(path, data={"token": token, "result": "succeeded"})

    assert response.status_code == 404
    assert await snapshot(api, intent["id"]) == before
    assert await processor_counts(services, merchant.id) == (0, 0)


# --- amounts and currencies -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "amount"),
    [("usd", 50), ("usd", 99999999), ("jpy", 50), ("kwd", 1), ("btn", 1), ("eur", 1999)],
)
async def test_amount_in_minor_units_is_charged_exactly(api, merchant, services, currency, amount):
    intent = await paid_intent(api, amount=amount, currency=currency)

    assert (intent["status"], intent["amount"], intent["currency"]) == ("succeeded", amount, currency)
    assert intent["amount_received"] == amount
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {currency: amount}


@pytest.mark.parametrize(
    ("currency", "amount"),
    [
        ("jpy", "49"),
        ("usd", "49"),
        ("usd", "100000000"),
        ("kwd", "0"),
        ("usd", "12.5"),
        ("usd", "-1"),
        ("usd", "abc"),
        ("usd", ""),
        ("usd", "1e3"),
        ("usd", "0x10"),
        ("usd", " 100"),
    ],
)
async def test_invalid_amount_is_refused_naming_amount_and_creates_nothing(api, currency, amount):
    body = await create_intent(api, expect=400, amount=amount, currency=currency)

    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "amount"
    assert (await api.get("/v1/payment_intents")).json()["data"] == []


@pytest.mark.parametrize("currency", ["xyz", "xau", "usdx", "", "us"])
async def test_unknown_currency_is_refused_naming_currency(api, currency):
    body = await create_intent(api, expect=400, currency=currency)

    assert body["error"]["param"] == "currency"
    assert (await api.get("/v1/payment_intents")).json()["data"] == []


@pytest.mark.parametrize("amount", [12.5, -1, "12.5", True, None, [2000], 100000000])
async def test_invalid_amount_in_a_json_body_is_refused_naming_amount(api, amount):
    response = await api.post("/v1/payment_intents", json={"amount": amount, "currency": "usd"})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "amount"


async def test_json_bodies_work_like_form_bodies(api, merchant, services):
    created = await api.post(
        "/v1/payment_intents",
        json={
            "amount": 3000,
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "confirm": True,
            "capture_method": "manual",
            "metadata": {"order": "42"},
        },
    )
    assert created.status_code == 200, created.text
    intent = created.json()
    assert (intent["status"], intent["amount_capturable"], intent["metadata"]) == (
        "requires_capture",
        3000,
        {"order": "42"},
    )

    captured = await api.post(f"/v1/payment_intents/{intent['id']}/capture", json={"amount_to_capture": 2500})

    assert captured.status_code == 200, captured.text
    assert (captured.json()["status"], captured.json()["amount_received"]) == ("succeeded", 2500)
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {"usd": 2500}


# --- what the processor sees ----------------------------------------------------------------


async def test_processor_sees_exactly_one_authorization_per_authorized_payment(api, anonymous, merchant, services):
    await paid_intent(api)
    await paid_intent(api, currency="jpy", amount=500)
    declined = await create_intent(api)
    assert (await confirm(api, declined["id"], payment_method="pm_card_chargeDeclined")).status_code == 402
    assert (await confirm(api, declined["id"], payment_method="pm_card_visa")).status_code == 200
    manual = await manual_intent(api)
    await post(api, f"/v1/payment_intents/{manual['id']}/capture", amount_to_capture=700)
    voided = await manual_intent(api)
    await post(api, f"/v1/payment_intents/{voided['id']}/cancel")
    authenticated = await three_ds_intent(api)
    path, token = three_ds_form(authenticated)
    await anonymous.post(path, data={"token": token, "result": "succeeded"})
    abandoned = await three_ds_intent(api)
    path, token = three_ds_form(abandoned)
    await anonymous.post(path, data={"token": token, "result": "failed"})

    intents = (await api.get("/v1/payment_intents", params={"limit": 100})).json()["data"]
    succeeded = [i for i in intents if i["status"] == "succeeded"]
    canceled = [i for i in intents if i["status"] == "canceled"]
    assert (len(succeeded), len(canceled)) == (5, 1)
    assert await processor_counts(services, merchant.id) == (len(succeeded) + len(canceled), len(succeeded))
    assert await services.sandbox.captured_minor_by_currency(merchant.id) == {
        "usd": sum(i["amount_received"] for i in succeeded if i["currency"] == "usd"),
        "jpy": 500,
    }
