"""Card tokens (Stripe's POST /v1/tokens): masked card facts only, bound to their merchant (PCI
tokenization T3), spent exactly once by creating a payment method with `card[token]`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent

VISA = "4242424242424242"
AMEX = "378282246310005"
DECLINE = "4000000000000002"


def _card(number: str = VISA, exp_month: str = "12", exp_year: str = "2034", **extra: str) -> dict[str, str]:
    data = {"card[number]": number, "card[exp_month]": exp_month, "card[exp_year]": exp_year}
    data.update({f"card[{k}]": v for k, v in extra.items()})
    return data


async def _token(api: httpx.AsyncClient, number: str = VISA, **extra: str) -> dict[str, Any]:
    response = await api.post("/v1/tokens", data=_card(number, **extra))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _pm_from_token(api: httpx.AsyncClient, token_id: str) -> httpx.Response:
    return await api.post("/v1/payment_methods", data={"type": "card", "card[token]": token_id})


@pytest.fixture
async def other_api(app, services) -> AsyncIterator[httpx.AsyncClient]:
    other = await new_merchant(services, "Other")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


async def test_token_is_a_stripe_token_object_showing_only_masked_card_facts(api):
    token = await _token(api, AMEX, cvc="1234", exp_month="7", exp_year="31")

    assert token["id"].startswith("tok_")
    assert token["object"] == "token"
    assert token["type"] == "card"
    assert token["used"] is False
    assert token["livemode"] is False
    assert isinstance(token["created"], int)
    assert token["client_ip"] == "127.0.0.1"
    card = token["card"]
    assert card["object"] == "card"
    assert (card["brand"], card["last4"], card["exp_month"], card["exp_year"]) == ("American Express", "0005", 7, 2031)
    assert card["funding"] == "credit"
    assert len(card["fingerprint"]) >= 16
    text = str(token)
    assert AMEX not in text
    assert "1234" not in text


async def test_token_fingerprint_is_the_merchants_fingerprint_of_the_card(api, other_api):
    token = await _token(api)
    pm = await card_payment_method(api, VISA)
    theirs = await _token(other_api)
    assert token["card"]["fingerprint"] == pm["card"]["fingerprint"]
    assert theirs["card"]["fingerprint"] != token["card"]["fingerprint"]


async def test_retrieve_returns_the_same_token(api):
    token = await _token(api)
    response = await api.get(f"/v1/tokens/{token['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == token


async def test_t3_token_of_another_merchant_is_missing_and_stays_unused(api, other_api):
    token = await _token(api)

    retrieved = await other_api.get(f"/v1/tokens/{token['id']}")
    spent = await _pm_from_token(other_api, token["id"])

    assert retrieved.status_code == 404, retrieved.text
    assert retrieved.json()["error"]["code"] == "resource_missing"
    assert spent.status_code == 404, spent.text
    assert spent.json()["error"]["param"] == "card[token]"
    assert (await other_api.get("/v1/payment_methods")).json()["data"] == []
    assert (await api.get(f"/v1/tokens/{token['id']}")).json()["used"] is False


async def test_card_token_creates_a_payment_method_of_the_same_card_once(api):
    token = await _token(api, cvc="123")

    first = await _pm_from_token(api, token["id"])
    again = await _pm_from_token(api, token["id"])

    assert first.status_code == 200, first.text
    pm = first.json()
    assert pm["id"].startswith("pm_")
    assert pm["object"] == "payment_method"
    assert (pm["card"]["brand"], pm["card"]["last4"]) == ("visa", "4242")
    assert pm["card"]["fingerprint"] == token["card"]["fingerprint"]
    assert again.status_code == 400, again.text
    error = again.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "token_already_used",
        "card[token]",
    )
    assert (await api.get(f"/v1/tokens/{token['id']}")).json()["used"] is True
    assert [m["id"] for m in (await api.get("/v1/payment_methods")).json()["data"]] == [pm["id"]]


async def test_payment_method_from_a_token_pays_through_the_vault(api):
    paid_pm = (await _pm_from_token(api, (await _token(api))["id"])).json()
    declined_pm = (await _pm_from_token(api, (await _token(api, DECLINE))["id"])).json()

    paid = await create_intent(api, payment_method=paid_pm["id"], confirm="true")
    declined = await create_intent(api, expect=402, payment_method=declined_pm["id"], confirm="true")

    assert paid["status"] == "succeeded"
    assert paid["amount_received"] == 2000
    # The processor saw the tokenized card itself: its decline card is declined.
    assert declined["error"]["decline_code"] == "generic_decline"


async def test_concurrent_uses_of_one_token_create_one_payment_method(api):
    token = await _token(api)
    responses = await asyncio.gather(*(_pm_from_token(api, token["id"]) for _ in range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 400, 400, 400], [r.text for r in responses]
    assert len((await api.get("/v1/payment_methods")).json()["data"]) == 1


async def test_unknown_token_is_a_404_naming_card_token(api):
    response = await _pm_from_token(api, "tok_doesnotexist")
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("resource_missing", "card[token]")
    assert "tok_doesnotexist" in error["message"]


@pytest.mark.parametrize(
    ("data", "status", "param"),
    [
        ({"type": "card", "card[token]": "tok_x", "card[number]": VISA}, 400, "card[number]"),
        ({"type": "card", "card[token]": "tok x"}, 400, "card[token]"),
        ({"type": "card", "card_token": "tok_x"}, 400, "card_token"),
        ({"type": "card"}, 400, "card"),
    ],
    ids=["token-with-card-number", "malformed-token", "card_token-is-not-a-parameter", "neither"],
)
async def test_card_token_parameter_errors_name_the_parameter(api, data, status, param):
    response = await api.post("/v1/payment_methods", data=data)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert VISA not in response.text


@pytest.mark.parametrize(
    ("card", "code", "param"),
    [
        (_card("4242424242424241"), "incorrect_number", "card[number]"),
        (_card(VISA, exp_month="13"), "invalid_expiry_month", "card[exp_month]"),
        (_card(VISA, exp_year="2001"), "invalid_expiry_year", "card[exp_year]"),
        (_card(VISA, cvc="12"), "invalid_cvc", "card[cvc]"),
    ],
    ids=["luhn", "month", "year", "cvc"],
)
async def test_bad_card_is_a_stripe_card_error_and_creates_no_token(api, card, code, param):
    response = await api.post("/v1/tokens", data=card)
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("card_error", code, param)
    assert card["card[number]"] not in response.text


async def test_token_requires_a_secret_key(anonymous):
    response = await anonymous.post("/v1/tokens", data=_card())
    assert response.status_code == 401, response.text


async def test_idempotency_key_replays_the_same_token_and_refuses_another_card(api):
    headers = {"Idempotency-Key": "tok-key-1"}
    first = await api.post("/v1/tokens", data=_card(cvc="123"), headers=headers)
    replay = await api.post("/v1/tokens", data=_card(cvc="123"), headers=headers)
    other_card = await api.post("/v1/tokens", data=_card("5555555555554444"), headers=headers)

    assert first.status_code == replay.status_code == 200, first.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    assert other_card.status_code == 400, other_card.text
    assert other_card.json()["error"]["type"] == "idempotency_error"


async def test_unknown_token_parameter_is_refused(api):
    response = await api.post("/v1/tokens", data={**_card(), "card[bogus]": "1"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "card[bogus]"
