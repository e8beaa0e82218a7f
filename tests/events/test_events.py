"""Events: one for each change that moves money, written in the change's own transaction, carrying a
snapshot of the object as it was at that moment; filtered by type, retrieved by id, and private to
their merchant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent, paid_intent


async def _events(api: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await api.get("/v1/events", params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


def _types(events: list[dict[str, Any]]) -> list[str]:
    """Oldest first, which reads like the story of the payment."""
    return [e["type"] for e in reversed(events)]


def _by_type(events: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    matching = [e for e in events if e["type"] == type_]
    assert len(matching) == 1, _types(events)
    obj: dict[str, Any] = matching[0]["data"]["object"]
    return obj


async def _post(api: httpx.AsyncClient, path: str, expect: int = 200, **data: str) -> dict[str, Any]:
    response = await api.post(path, data=data)
    assert response.status_code == expect, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture
async def other_api(app: Any, services: Any) -> AsyncIterator[httpx.AsyncClient]:
    other = await new_merchant(services, "Other merchant")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


async def test_payment_writes_created_charge_succeeded_and_succeeded(api):
    intent = await paid_intent(api, amount=2500)
    events = await _events(api)
    assert _types(events) == ["payment_intent.created", "charge.succeeded", "payment_intent.succeeded"]
    for event in events:
        assert event["object"] == "event"
        assert event["id"].startswith("evt_")
        assert event["livemode"] is False
        assert isinstance(event["created"], int)
        assert event["api_version"]

    created = _by_type(events, "payment_intent.created")
    assert created["id"] == intent["id"]
    assert created["status"] == "requires_confirmation"  # the snapshot, not today's state
    assert created["amount_received"] == 0

    charge = _by_type(events, "charge.succeeded")
    assert charge["object"] == "charge"
    assert charge["id"] == intent["latest_charge"]
    assert (charge["amount"], charge["amount_captured"], charge["currency"]) == (2500, 2500, "usd")
    assert charge["captured"] is True
    assert charge["payment_intent"] == intent["id"]
    assert charge["payment_method_details"]["card"]["last4"] == "4242"

    succeeded = _by_type(events, "payment_intent.succeeded")
    assert succeeded == intent


async def test_manual_capture_writes_capturable_then_captured_and_succeeded(api):
    intent = await create_intent(api, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    assert intent["status"] == "requires_capture"
    events = await _events(api)
    assert _types(events) == ["payment_intent.created", "charge.succeeded", "payment_intent.amount_capturable_updated"]
    authorized = _by_type(events, "charge.succeeded")
    assert (authorized["captured"], authorized["amount_captured"]) == (False, 0)
    assert _by_type(events, "payment_intent.amount_capturable_updated")["amount_capturable"] == 2000

    await _post(api, f"/v1/payment_intents/{intent['id']}/capture", amount_to_capture="1500")
    events = await _events(api)
    assert _types(events)[3:] == ["charge.captured", "payment_intent.succeeded"]
    captured = _by_type(events, "charge.captured")
    assert (captured["captured"], captured["amount_captured"]) == (True, 1500)
    succeeded = _by_type(events, "payment_intent.succeeded")
    assert (succeeded["status"], succeeded["amount_received"], succeeded["amount_capturable"]) == ("succeeded", 1500, 0)


async def test_refunds_write_refund_created_and_charge_refunded_with_running_totals(api):
    intent = await paid_intent(api)
    first = await _post(api, "/v1/refunds", payment_intent=intent["id"], amount="500")
    second = await _post(api, "/v1/refunds", payment_intent=intent["id"])

    events = await _events(api)
    assert _types(events)[3:] == ["refund.created", "charge.refunded", "refund.created", "charge.refunded"]
    refunds = [e["data"]["object"] for e in reversed(events) if e["type"] == "refund.created"]
    assert [(r["id"], r["amount"], r["status"]) for r in refunds] == [
        (first["id"], 500, "succeeded"),
        (second["id"], 1500, "succeeded"),
    ]
    charges = [e["data"]["object"] for e in reversed(events) if e["type"] == "charge.refunded"]
    assert [(c["amount_refunded"], c["refunded"]) for c in charges] == [(500, False), (2000, True)]
    assert {c["id"] for c in charges} == {intent["latest_charge"]}


async def test_cancel_after_authorization_writes_canceled_and_charge_refunded(api):
    intent = await create_intent(api, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    await _post(api, f"/v1/payment_intents/{intent['id']}/cancel", cancellation_reason="requested_by_customer")
    events = await _events(api)
    assert _types(events)[3:] == ["payment_intent.canceled", "charge.refunded"]
    canceled = _by_type(events, "payment_intent.canceled")
    assert (canceled["status"], canceled["cancellation_reason"]) == ("canceled", "requested_by_customer")
    charge = _by_type(events, "charge.refunded")
    assert (charge["refunded"], charge["amount_refunded"]) == (True, 2000)


async def test_cancel_before_confirmation_writes_only_canceled(api):
    intent = await create_intent(api)
    await _post(api, f"/v1/payment_intents/{intent['id']}/cancel")
    assert _types(await _events(api)) == ["payment_intent.created", "payment_intent.canceled"]


async def test_decline_writes_charge_failed_and_payment_failed(api):
    await create_intent(api, expect=402, payment_method="pm_card_chargeDeclinedInsufficientFunds", confirm=True)
    events = await _events(api)
    assert _types(events) == ["payment_intent.created", "charge.failed", "payment_intent.payment_failed"]
    charge = _by_type(events, "charge.failed")
    assert (charge["status"], charge["paid"], charge["amount_captured"]) == ("failed", False, 0)
    assert charge["failure_code"] == "card_declined"
    failed = _by_type(events, "payment_intent.payment_failed")
    assert failed["status"] == "requires_payment_method"
    assert failed["last_payment_error"]["decline_code"] == "insufficient_funds"


async def test_three_d_secure_writes_requires_action(api):
    intent = await create_intent(api, payment_method="pm_card_threeDSecureRequired", confirm=True)
    assert intent["status"] == "requires_action"
    events = await _events(api)
    assert _types(events) == ["payment_intent.created", "payment_intent.requires_action"]
    assert _by_type(events, "payment_intent.requires_action")["next_action"]["type"] == "redirect_to_url"


REFUSED = [
    ("refund-too-large", "/v1/refunds", {"amount": "2001"}, 400),
    ("capture-succeeded", "/v1/payment_intents/{pi}/capture", {}, 400),
    ("confirm-succeeded", "/v1/payment_intents/{pi}/confirm", {}, 400),
    ("cancel-succeeded", "/v1/payment_intents/{pi}/cancel", {}, 400),
    ("unknown-parameter", "/v1/refunds", {"bogus": "1"}, 400),
]


@pytest.mark.parametrize(("path", "data", "status"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
async def test_refused_requests_write_no_event(api, path, data, status):
    intent = await paid_intent(api)
    before = await _events(api)
    if path == "/v1/refunds":
        data = {"payment_intent": intent["id"], **data}
    response = await api.post(path.format(pi=intent["id"]), data=data)
    assert response.status_code == status, response.text
    assert await _events(api) == before


async def test_idempotent_replay_writes_no_second_event(api):
    headers = {"Idempotency-Key": "order-6735"}
    data = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
    first = await api.post("/v1/payment_intents", data=data, headers=headers)
    replay = await api.post("/v1/payment_intents", data=data, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert _types(await _events(api)) == ["payment_intent.created", "charge.succeeded", "payment_intent.succeeded"]


async def test_type_filter_exact_and_wildcard(api):
    intent = await paid_intent(api)
    await _post(api, "/v1/refunds", payment_intent=intent["id"], amount="100")
    await api.post("/v1/customers")

    assert _types(await _events(api, type="charge.succeeded")) == ["charge.succeeded"]
    assert _types(await _events(api, type="payment_intent.*")) == ["payment_intent.created", "payment_intent.succeeded"]
    assert _types(await _events(api, type="charge.*")) == ["charge.succeeded", "charge.refunded"]
    assert _types(await _events(api, type="customer.*")) == ["customer.created"]
    assert await _events(api, type="payment_intent") == []
    assert await _events(api, type="no_such.event") == []


@pytest.mark.parametrize("type_", ["%", "%.*", "_harge.succeeded", "payment\\_intent.*", "*"])
async def test_type_filter_treats_sql_wildcards_literally(api, type_):
    await paid_intent(api)
    assert await _events(api, type=type_) == []


async def test_event_list_is_newest_first_and_paginates(api):
    await paid_intent(api)
    events = await _events(api)
    created = [e["created"] for e in events]
    assert created == sorted(created, reverse=True)
    first = (await api.get("/v1/events", params={"limit": 2})).json()
    rest = (await api.get("/v1/events", params={"starting_after": first["data"][-1]["id"]})).json()
    assert first["has_more"] is True
    assert [e["id"] for e in first["data"] + rest["data"]] == [e["id"] for e in events]


async def test_retrieve_event_by_id(api):
    await paid_intent(api)
    for event in await _events(api):
        response = await api.get(f"/v1/events/{event['id']}")
        assert response.status_code == 200, response.text
        assert response.json() == event


async def test_other_merchants_event_is_404_and_not_listed(api, other_api):
    await paid_intent(other_api)
    theirs = await _events(other_api)
    assert len(theirs) == 3
    for event in theirs:
        response = await api.get(f"/v1/events/{event['id']}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "resource_missing"
    assert await _events(api) == []


async def test_unknown_event_is_404(api):
    response = await api.get("/v1/events/evt_doesnotexist")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "resource_missing"


async def test_events_cannot_be_expanded(api):
    await paid_intent(api)
    event = (await _events(api))[0]
    response = await api.get(f"/v1/events/{event['id']}", params={"expand[]": "data.object"})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "expand"


async def test_card_details_in_event_snapshots_are_masked(api):
    pm = await card_payment_method(api, "378282246310005", cvc="1234")
    await create_intent(api, payment_method=pm["id"], confirm=True)
    response = await api.get("/v1/events", params={"limit": 100})
    assert "378282246310005" not in response.text
    assert '"1234"' not in response.text
    charge = _by_type(response.json()["data"], "charge.succeeded")
    assert charge["payment_method_details"]["card"]["iin"] == "378282"


async def test_event_snapshot_keeps_the_objects_fields_in_the_apis_order(api):
    """The snapshot reads like the object it was taken from: the same fields in the same order (on
    PostgreSQL a jsonb column reordered them, shorter keys first)."""
    intent = await paid_intent(api)
    snapshot = _by_type(await _events(api), "payment_intent.succeeded")
    assert snapshot == intent
    assert list(snapshot) == list(intent)
    charge = _by_type(await _events(api), "charge.succeeded")
    assert list(charge)[:2] == ["id", "object"]
    assert list(charge["payment_method_details"]["card"]) == list(
        (await api.get(f"/v1/charges/{charge['id']}")).json()["payment_method_details"]["card"]
    )
