"""Refunds through the HTTP API: never more than was captured, by payment intent or by charge,
with the charge, the events and the processor agreeing on how much went back."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tests.factories import create_intent, paid_intent

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


async def refund(api: httpx.AsyncClient, **data: Any) -> httpx.Response:
    return await api.post("/v1/refunds", data={k: str(v) for k, v in data.items()})


async def refunded(api: httpx.AsyncClient, **data: Any) -> dict[str, Any]:
    response = await refund(api, **data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "succeeded", body
    return body


async def charge_of(api: httpx.AsyncClient, intent: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/v1/charges/{intent['latest_charge']}")).json()
    return body


async def refunds_of(api: httpx.AsyncClient, intent_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = (await api.get("/v1/refunds", params={"payment_intent": intent_id})).json()["data"]
    return data


async def snapshot(api: httpx.AsyncClient, intent_id: str) -> dict[str, Any]:
    """Everything a refused refund must leave as it was."""
    return {
        "intent": (await api.get(f"/v1/payment_intents/{intent_id}")).json(),
        "charges": (await api.get("/v1/charges", params={"payment_intent": intent_id})).json()["data"],
        "refunds": await refunds_of(api, intent_id),
        "events": [e["id"] for e in await all_events(api)],
    }


async def processor_refunded_minor(services: Any, merchant_id: str) -> int:
    return sum(charge.refunded_minor for charge in await services.sandbox.list_charges(merchant_id))


async def captured_intent(api: httpx.AsyncClient, amount: int, amount_to_capture: int) -> dict[str, Any]:
    intent = await paid_intent(api, amount=amount, capture_method="manual")
    response = await api.post(
        f"/v1/payment_intents/{intent['id']}/capture", data={"amount_to_capture": str(amount_to_capture)}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# --- full and partial refunds ---------------------------------------------------------------


async def test_full_refund_returns_the_whole_captured_amount(api, merchant, services):
    intent = await paid_intent(api, amount=2000)

    created = await refunded(api, payment_intent=intent["id"], reason="requested_by_customer")

    assert (created["amount"], created["currency"], created["reason"]) == (2000, "usd", "requested_by_customer")
    assert (created["payment_intent"], created["charge"]) == (intent["id"], intent["latest_charge"])
    charge = await charge_of(api, intent)
    assert (charge["amount_refunded"], charge["refunded"]) == (2000, True)
    # Stripe: a refunded payment intent stays succeeded; the money movement is on the charge.
    assert (await api.get(f"/v1/payment_intents/{intent['id']}")).json()["status"] == "succeeded"
    assert await processor_refunded_minor(services, merchant.id) == 2000
    types = [e["type"] for e in await all_events(api)]
    assert {"refund.created", "charge.refunded"} <= set(types)


async def test_partial_refund_leaves_the_charge_partly_refunded(api, merchant, services):
    intent = await paid_intent(api, amount=2000)

    created = await refunded(api, payment_intent=intent["id"], amount=500)

    assert created["amount"] == 500
    charge = await charge_of(api, intent)
    assert (charge["amount_refunded"], charge["refunded"], charge["amount_captured"]) == (500, False, 2000)
    assert await processor_refunded_minor(services, merchant.id) == 500


@pytest.mark.parametrize("parts", [[500, 700, 800], [1, 1999], [1000, 999, 1]])
async def test_partial_refunds_may_add_up_to_exactly_the_captured_amount(api, merchant, services, parts):
    intent = await paid_intent(api, amount=2000)

    for part in parts:
        await refunded(api, payment_intent=intent["id"], amount=part)

    charge = await charge_of(api, intent)
    assert (charge["amount_refunded"], charge["refunded"]) == (2000, True)
    assert sorted(r["amount"] for r in await refunds_of(api, intent["id"])) == sorted(parts)
    assert await processor_refunded_minor(services, merchant.id) == 2000
    assert [e["type"] for e in await all_events(api)].count("refund.created") == len(parts)


async def test_refund_without_an_amount_returns_what_is_left(api):
    intent = await paid_intent(api, amount=2000)
    await refunded(api, payment_intent=intent["id"], amount=1200)

    rest = await refunded(api, payment_intent=intent["id"])

    assert rest["amount"] == 800
    assert (await charge_of(api, intent))["refunded"] is True


@pytest.mark.parametrize(("earlier", "amount"), [([], 2001), ([1500], 501), ([500, 700], 801), ([], 99999999)])
async def test_refund_above_the_unrefunded_amount_is_refused_and_changes_nothing(
    api, merchant, services, earlier, amount
):
    intent = await paid_intent(api, amount=2000)
    for part in earlier:
        await refunded(api, payment_intent=intent["id"], amount=part)
    before = await snapshot(api, intent["id"])

    response = await refund(api, payment_intent=intent["id"], amount=amount)

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "amount", "amount_too_large")
    assert await snapshot(api, intent["id"]) == before
    assert await processor_refunded_minor(services, merchant.id) == sum(earlier)


async def test_refund_of_a_fully_refunded_payment_is_refused(api):
    intent = await paid_intent(api, amount=2000)
    await refunded(api, payment_intent=intent["id"])
    before = await snapshot(api, intent["id"])

    response = await refund(api, payment_intent=intent["id"], amount=1)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "charge_already_refunded"
    assert await snapshot(api, intent["id"]) == before


@pytest.mark.parametrize("amount", ["0", "-1", "12.5", "abc", ""])
async def test_refund_of_an_invalid_amount_is_refused_naming_amount(api, amount):
    intent = await paid_intent(api)
    before = await snapshot(api, intent["id"])

    response = await refund(api, payment_intent=intent["id"], amount=amount)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "amount"
    assert await snapshot(api, intent["id"]) == before


async def test_refund_after_a_partial_capture_is_limited_to_the_captured_amount(api, merchant, services):
    intent = await captured_intent(api, amount=2000, amount_to_capture=1200)
    before = await snapshot(api, intent["id"])

    too_much = await refund(api, payment_intent=intent["id"], amount=1201)

    assert too_much.status_code == 400
    assert too_much.json()["error"]["code"] == "amount_too_large"
    assert await snapshot(api, intent["id"]) == before
    rest = await refunded(api, payment_intent=intent["id"])
    assert rest["amount"] == 1200
    charge = await charge_of(api, intent)
    assert (charge["amount_captured"], charge["amount_refunded"], charge["refunded"]) == (1200, 1200, True)
    assert await processor_refunded_minor(services, merchant.id) == 1200


@pytest.mark.parametrize(("currency", "amount", "part"), [("jpy", 5000, 1), ("kwd", 1500, 1), ("btn", 10, 9)])
async def test_refund_amounts_are_minor_units_of_the_payment_currency(api, currency, amount, part):
    intent = await paid_intent(api, amount=amount, currency=currency)

    first = await refunded(api, payment_intent=intent["id"], amount=part)
    rest = await refunded(api, payment_intent=intent["id"])

    assert (first["amount"], first["currency"]) == (part, currency)
    assert rest["amount"] == amount - part
    assert (await charge_of(api, intent))["amount_refunded"] == amount


# --- refunds by charge ----------------------------------------------------------------------


async def test_refund_by_charge_id_refunds_that_charge(api):
    intent = await paid_intent(api, amount=2000)

    created = await refunded(api, charge=intent["latest_charge"], amount=300)

    assert (created["charge"], created["payment_intent"], created["amount"]) == (
        intent["latest_charge"],
        intent["id"],
        300,
    )
    assert (await charge_of(api, intent))["amount_refunded"] == 300


async def test_refund_by_the_failed_charge_of_a_later_paid_intent_is_refused(api, merchant, services):
    intent = await create_intent(api)
    declined = await api.post(
        f"/v1/payment_intents/{intent['id']}/confirm", data={"payment_method": "pm_card_chargeDeclined"}
    )
    failed_charge = declined.json()["error"]["charge"]
    paid = await api.post(f"/v1/payment_intents/{intent['id']}/confirm", data={"payment_method": "pm_card_visa"})
    assert paid.json()["status"] == "succeeded"
    before = await snapshot(api, intent["id"])

    response = await refund(api, charge=failed_charge)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "charge"
    assert await snapshot(api, intent["id"]) == before
    assert await processor_refunded_minor(services, merchant.id) == 0


@pytest.mark.parametrize(("named", "param"), [((), "payment_intent"), (("payment_intent", "charge"), "charge")])
async def test_refund_needs_exactly_one_of_payment_intent_and_charge(api, named, param):
    intent = await paid_intent(api)
    ids = {"payment_intent": intent["id"], "charge": intent["latest_charge"]}
    before = await snapshot(api, intent["id"])

    response = await refund(api, **{name: ids[name] for name in named})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert await snapshot(api, intent["id"]) == before


@pytest.mark.parametrize(("param", "value"), [("payment_intent", "pi_missing"), ("charge", "ch_missing")])
async def test_refund_of_an_unknown_payment_is_a_404_naming_the_parameter(api, param, value):
    response = await refund(api, **{param: value})

    assert response.status_code == 404
    assert response.json()["error"]["param"] == param


# --- payments that cannot be refunded -------------------------------------------------------


async def _unrefundable(api: httpx.AsyncClient, kind: str) -> dict[str, Any]:
    if kind == "uncaptured":
        return await paid_intent(api, capture_method="manual")
    if kind == "declined":
        intent = await create_intent(api)
        await api.post(f"/v1/payment_intents/{intent['id']}/confirm", data={"payment_method": "pm_card_chargeDeclined"})
        return (await api.get(f"/v1/payment_intents/{intent['id']}")).json()
    if kind == "unconfirmed":
        return await create_intent(api, payment_method="pm_card_visa")
    intent = await paid_intent(api, capture_method="manual")
    return (await api.post(f"/v1/payment_intents/{intent['id']}/cancel")).json()


@pytest.mark.parametrize(
    ("kind", "by"),
    [
        ("uncaptured", "payment_intent"),
        ("uncaptured", "charge"),
        ("declined", "payment_intent"),
        ("declined", "charge"),
        ("unconfirmed", "payment_intent"),  # no charge exists to name
        ("canceled", "payment_intent"),
        ("canceled", "charge"),
    ],
)
async def test_refund_of_a_payment_that_captured_nothing_is_refused_and_changes_nothing(
    api, merchant, services, kind, by
):
    intent = await _unrefundable(api, kind)
    target = intent["id"] if by == "payment_intent" else intent["latest_charge"]
    before = await snapshot(api, intent["id"])

    response = await refund(api, **{by: target})

    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "payment_intent_unexpected_state")
    assert await snapshot(api, intent["id"]) == before
    assert await processor_refunded_minor(services, merchant.id) == 0


# --- list, retrieve, update -----------------------------------------------------------------


async def test_list_refunds_filtered_by_payment_intent_and_by_charge(api):
    first = await paid_intent(api, amount=2000)
    second = await paid_intent(api, amount=3000)
    a = await refunded(api, payment_intent=first["id"], amount=100)
    b = await refunded(api, payment_intent=first["id"], amount=200)
    c = await refunded(api, payment_intent=second["id"], amount=300)

    assert [r["id"] for r in await refunds_of(api, first["id"])] == [b["id"], a["id"]]
    assert [r["id"] for r in await refunds_of(api, second["id"])] == [c["id"]]
    by_charge = (await api.get("/v1/refunds", params={"charge": second["latest_charge"]})).json()
    assert [r["id"] for r in by_charge["data"]] == [c["id"]]
    everything = (await api.get("/v1/refunds")).json()
    assert (everything["object"], len(everything["data"]), everything["has_more"]) == ("list", 3, False)


async def test_retrieve_refund_returns_what_was_created(api):
    intent = await paid_intent(api)
    created = await refunded(api, payment_intent=intent["id"], amount=700, **{"metadata[ticket]": "T-1"})

    response = await api.get(f"/v1/refunds/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created
    assert created["metadata"] == {"ticket": "T-1"}
    assert (await api.get("/v1/refunds/re_missing")).status_code == 404


async def test_update_refund_merges_metadata_and_changes_no_money(api, merchant, services):
    intent = await paid_intent(api)
    created = await refunded(api, payment_intent=intent["id"], amount=700, **{"metadata[a]": "1", "metadata[b]": "2"})

    response = await api.post(f"/v1/refunds/{created['id']}", data={"metadata[b]": "", "metadata[c]": "3"})

    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["metadata"] == {"a": "1", "c": "3"}
    assert {k: v for k, v in updated.items() if k != "metadata"} == {
        k: v for k, v in created.items() if k != "metadata"
    }
    assert (await api.get(f"/v1/refunds/{created['id']}")).json() == updated
    assert (await charge_of(api, intent))["amount_refunded"] == 700
    assert await processor_refunded_minor(services, merchant.id) == 700


@pytest.mark.parametrize(("data", "param"), [({"amount": "5"}, "amount"), ({"reason": "bored"}, "reason")])
async def test_update_refund_refuses_anything_but_metadata(api, data, param):
    intent = await paid_intent(api)
    created = await refunded(api, payment_intent=intent["id"], amount=700)

    response = await api.post(f"/v1/refunds/{created['id']}", data=data)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert (await api.get(f"/v1/refunds/{created['id']}")).json() == created


async def test_refund_with_an_unknown_reason_is_refused(api):
    intent = await paid_intent(api)
    before = await snapshot(api, intent["id"])

    response = await refund(api, payment_intent=intent["id"], reason="changed_my_mind")

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "reason"
    assert await snapshot(api, intent["id"]) == before


async def test_refund_with_a_json_body_works_like_a_form_body(api):
    intent = await paid_intent(api, amount=2000)

    response = await api.post(
        "/v1/refunds", json={"payment_intent": intent["id"], "amount": 250, "metadata": {"source": "json"}}
    )

    assert response.status_code == 200, response.text
    assert (response.json()["amount"], response.json()["metadata"]) == (250, {"source": "json"})
    assert (await api.post("/v1/refunds", json={"payment_intent": intent["id"], "amount": 2.5})).status_code == 400
    assert (await charge_of(api, intent))["amount_refunded"] == 250
