"""Card payment methods: what is shown of a card (never the number or CVC), Stripe's card errors,
keyed per-merchant fingerprints (PCI DSS 3.5.1.1), and attaching to customers."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from tests.conftest import new_merchant
from tests.factories import card_payment_method

from strongroom.vault.tables import vault_cards

VISA = "4242424242424242"


def _card_form(number: str, exp_month: int | str = 12, exp_year: int | str = 2034, cvc: str | None = None) -> dict:
    data = {"type": "card", "card[number]": number, "card[exp_month]": str(exp_month), "card[exp_year]": str(exp_year)}
    if cvc is not None:
        data["card[cvc]"] = cvc
    return data


def _error(response: httpx.Response, status: int, type_: str = "invalid_request_error") -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_
    assert error["message"]
    return error


async def _customer(api: httpx.AsyncClient) -> str:
    response = await api.post("/v1/customers", data={"email": "c@example.com"})
    assert response.status_code == 200, response.text
    customer_id: str = response.json()["id"]
    return customer_id


async def _ids(api: httpx.AsyncClient, url: str, **params: Any) -> list[str]:
    response = await api.get(url, params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    return [obj["id"] for obj in response.json()["data"]]


async def _vault_rows(services: Any, merchant_id: str) -> int:
    async with services.db.read() as conn:
        query = sa.select(sa.func.count()).select_from(vault_cards).where(vault_cards.c.merchant_id == merchant_id)
        return int((await conn.execute(query)).scalar_one())


@pytest.fixture
async def other_api(app: Any, services: Any) -> AsyncIterator[httpx.AsyncClient]:
    other = await new_merchant(services, "Other merchant")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


# Stripe's test numbers (src/strongroom/connectors/sandbox/cards.py): brand, funding.
TEST_CARDS = [
    ("4242424242424242", "visa", "credit"),
    ("4000056655665556", "visa", "debit"),
    ("5555555555554444", "mastercard", "credit"),
    ("2223003122003222", "mastercard", "credit"),
    ("5200828282828210", "mastercard", "debit"),
    ("5105105105105100", "mastercard", "prepaid"),
    ("378282246310005", "amex", "credit"),
    ("371449635398431", "amex", "credit"),
    ("6011111111111117", "discover", "credit"),
    ("6011981111111113", "discover", "debit"),
    ("3056930009020004", "diners", "credit"),
    ("36227206271667", "diners", "credit"),
    ("3566002020360505", "jcb", "credit"),
    ("6200000000000005", "unionpay", "credit"),
]


@pytest.mark.parametrize(("number", "brand", "funding"), TEST_CARDS, ids=[f"{c[1]}-{c[0]}" for c in TEST_CARDS])
async def test_card_shows_brand_bin_last4_expiry_funding_only(api, number, brand, funding):
    cvc = "1234" if brand == "amex" else "123"
    response = await api.post("/v1/payment_methods", data=_card_form(number, 7, 2031, cvc))
    assert response.status_code == 200, response.text
    pm = response.json()
    assert pm["object"] == "payment_method"
    assert pm["id"].startswith("pm_")
    assert pm["type"] == "card"
    card = pm["card"]
    assert card["brand"] == brand
    # PCI DSS 3.4.1: at most BIN + last 4; the BIN is 8 digits for 16-digit PANs, else 6.
    assert card["iin"] == (number[:8] if len(number) == 16 else number[:6])
    assert card["last4"] == number[-4:]
    assert (card["exp_month"], card["exp_year"]) == (7, 2031)
    assert card["funding"] == funding
    assert len(card["fingerprint"]) >= 16
    assert "number" not in card
    assert "cvc" not in card
    assert number not in response.text
    assert f'"{cvc}"' not in response.text
    assert '"cvc"' not in response.text


async def test_retrieve_and_list_never_show_the_number_or_cvc(api):
    pm = await card_payment_method(api, "378282246310005", cvc="1234")
    retrieved = await api.get(f"/v1/payment_methods/{pm['id']}")
    listed = await api.get("/v1/payment_methods")
    for response in (retrieved, listed):
        assert response.status_code == 200
        assert "378282246310005" not in response.text
        assert '"1234"' not in response.text
        assert '"cvc"' not in response.text
    assert retrieved.json() == pm


async def test_spaces_and_dashes_in_the_number_and_two_digit_years_are_accepted(api):
    spaced = await card_payment_method(api, "4242 4242 4242 4242", exp_year="34")
    dashed = await card_payment_method(api, "4242-4242-4242-4242")
    assert spaced["card"]["last4"] == "4242"
    assert spaced["card"]["exp_year"] == 2034
    assert spaced["card"]["fingerprint"] == dashed["card"]["fingerprint"]


async def test_same_card_has_the_same_fingerprint_for_one_merchant(api):
    first = await card_payment_method(api, VISA, exp_month=1)
    second = await card_payment_method(api, VISA, exp_month=2)
    other_card = await card_payment_method(api, "4000056655665556")
    assert first["id"] != second["id"]
    assert first["card"]["fingerprint"] == second["card"]["fingerprint"]
    assert other_card["card"]["fingerprint"] != first["card"]["fingerprint"]


async def test_pci_3_5_1_1_fingerprint_differs_across_merchants_and_is_a_keyed_hash(api, other_api):
    mine = (await card_payment_method(api, VISA))["card"]["fingerprint"]
    theirs = (await card_payment_method(other_api, VISA))["card"]["fingerprint"]
    assert mine != theirs
    # A plain (unkeyed) hash of the PAN could be reversed by hashing the ~10^6 candidates that
    # share a card's BIN and last 4.
    plain = {hashlib.new(name, VISA.encode()).hexdigest() for name in ("sha256", "sha1", "md5", "sha512")}
    for fingerprint in (mine, theirs):
        assert not any(digest.startswith(fingerprint) for digest in plain)


def _month_before(today: dt.date) -> tuple[int, int]:
    return (12, today.year - 1) if today.month == 1 else (today.month - 1, today.year)


TODAY = dt.datetime.now(dt.UTC).date()

CARD_ERRORS = [
    ("luhn-invalid", _card_form("4242424242424241"), "incorrect_number", "card[number]"),
    ("letters", _card_form("4242abcd42424242"), "invalid_number", "card[number]"),
    ("too-short", _card_form("42424242424"), "invalid_number", "card[number]"),
    ("too-long", _card_form("42424242424242424242"), "invalid_number", "card[number]"),
    ("non-ascii-digits", _card_form("٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢"), "invalid_number", "card[number]"),
    ("month-0", _card_form(VISA, exp_month=0), "invalid_expiry_month", "card[exp_month]"),
    ("month-13", _card_form(VISA, exp_month=13), "invalid_expiry_month", "card[exp_month]"),
    ("last-year", _card_form(VISA, 12, TODAY.year - 1), "invalid_expiry_year", "card[exp_year]"),
    ("last-month", _card_form(VISA, *_month_before(TODAY)), "invalid_expiry_year", "card[exp_year]"),
    ("too-far", _card_form(VISA, 12, TODAY.year + 51), "invalid_expiry_year", "card[exp_year]"),
    ("visa-cvc-2", _card_form(VISA, cvc="12"), "invalid_cvc", "card[cvc]"),
    ("visa-cvc-4", _card_form(VISA, cvc="1234"), "invalid_cvc", "card[cvc]"),
    ("visa-cvc-letters", _card_form(VISA, cvc="12a"), "invalid_cvc", "card[cvc]"),
    ("amex-cvc-3", _card_form("378282246310005", cvc="123"), "invalid_cvc", "card[cvc]"),
]


@pytest.mark.parametrize(("form", "code", "param"), [c[1:] for c in CARD_ERRORS], ids=[c[0] for c in CARD_ERRORS])
async def test_invalid_card_is_a_402_card_error_and_writes_nothing(api, services, merchant, form, code, param):
    await card_payment_method(api)  # something to compare against
    before = (await _ids(api, "/v1/payment_methods"), await _ids(api, "/v1/events"))
    vault_before = await _vault_rows(services, merchant.id)

    response = await api.post("/v1/payment_methods", data=form)

    error = _error(response, 402, "card_error")
    assert error["code"] == code
    assert error["param"] == param
    assert "decline_code" not in error
    assert form["card[number]"] not in response.text
    assert (await _ids(api, "/v1/payment_methods"), await _ids(api, "/v1/events")) == before
    assert await _vault_rows(services, merchant.id) == vault_before


def _freeze_clock(monkeypatch: pytest.MonkeyPatch, now: dt.datetime) -> None:
    """The server's clock for card checks; a test reading the wall clock failed across a month's end."""
    monkeypatch.setattr("strongroom.payments.methods.utcnow", lambda: now)


async def test_card_expiring_this_month_is_accepted_up_to_its_last_second(api, monkeypatch):
    _freeze_clock(monkeypatch, dt.datetime(2026, 11, 30, 23, 59, 59))
    pm = await card_payment_method(api, VISA, exp_month=11, exp_year=2026)
    assert (pm["card"]["exp_month"], pm["card"]["exp_year"]) == (11, 2026)


async def test_card_expired_at_the_start_of_the_next_month(api, monkeypatch):
    _freeze_clock(monkeypatch, dt.datetime(2026, 12, 1, 0, 0, 0))
    error = _error(await api.post("/v1/payment_methods", data=_card_form(VISA, 11, 2026)), 402, "card_error")
    assert error["code"] == "invalid_expiry_year"


@pytest.mark.parametrize(
    ("form", "param"),
    [
        ({"type": "card", "card[exp_month]": "12", "card[exp_year]": "2034"}, "card[number]"),
        ({"type": "card", "card[number]": VISA, "card[exp_year]": "2034"}, "card[exp_month]"),
        ({"card[number]": VISA, "card[exp_month]": "12", "card[exp_year]": "2034"}, "type"),
    ],
    ids=["number", "exp_month", "type"],
)
async def test_missing_card_field_is_parameter_missing(api, form, param):
    error = _error(await api.post("/v1/payment_methods", data=form), 400)
    assert error["code"] == "parameter_missing"
    assert error["param"] == param


async def test_unknown_card_field_is_rejected_naming_it(api):
    response = await api.post("/v1/payment_methods", data={**_card_form(VISA), "card[bogus]": "1"})
    error = _error(response, 400)
    assert error["code"] == "parameter_unknown"
    assert error["param"] == "card[bogus]"
    assert VISA not in response.text


async def test_attach_list_by_customer_and_detach(api):
    customer_id = await _customer(api)
    attached_pm = await card_payment_method(api)
    loose_pm = await card_payment_method(api, "5555555555554444")

    response = await api.post(f"/v1/payment_methods/{attached_pm['id']}/attach", data={"customer": customer_id})
    assert response.status_code == 200, response.text
    assert response.json()["customer"] == customer_id

    assert await _ids(api, "/v1/payment_methods", customer=customer_id) == [attached_pm["id"]]
    nested = await api.get(f"/v1/customers/{customer_id}/payment_methods")
    assert [pm["id"] for pm in nested.json()["data"]] == [attached_pm["id"]]
    assert nested.json()["url"] == f"/v1/customers/{customer_id}/payment_methods"
    assert set(await _ids(api, "/v1/payment_methods")) >= {attached_pm["id"], loose_pm["id"]}

    response = await api.post(f"/v1/payment_methods/{attached_pm['id']}/detach")
    assert response.status_code == 200, response.text
    assert response.json()["customer"] is None
    assert await _ids(api, "/v1/payment_methods", customer=customer_id) == []
    assert await _ids(api, f"/v1/customers/{customer_id}/payment_methods") == []

    types = [e["type"] for e in (await api.get("/v1/events", params={"type": "payment_method.*"})).json()["data"]]
    assert types == ["payment_method.detached", "payment_method.attached"]


async def test_detach_of_an_unattached_payment_method_is_refused(api):
    pm = await card_payment_method(api)
    error = _error(await api.post(f"/v1/payment_methods/{pm['id']}/detach"), 400)
    assert error["code"] == "payment_method_unexpected_state"


async def test_payment_method_attached_to_one_customer_cannot_move_to_another(api):
    first, second = await _customer(api), await _customer(api)
    pm = await card_payment_method(api)
    await api.post(f"/v1/payment_methods/{pm['id']}/attach", data={"customer": first})
    error = _error(await api.post(f"/v1/payment_methods/{pm['id']}/attach", data={"customer": second}), 400)
    assert error["code"] == "payment_method_unexpected_state"
    assert (await api.get(f"/v1/payment_methods/{pm['id']}")).json()["customer"] == first


async def test_attach_to_another_merchants_customer_is_404_and_changes_nothing(api, other_api):
    their_customer = await _customer(other_api)
    pm = await card_payment_method(api)
    response = await api.post(f"/v1/payment_methods/{pm['id']}/attach", data={"customer": their_customer})
    error = _error(response, 404)
    assert error["code"] == "resource_missing"
    assert error["param"] == "customer"
    assert (await api.get(f"/v1/payment_methods/{pm['id']}")).json() == pm
    assert await _ids(other_api, f"/v1/customers/{their_customer}/payment_methods") == []


async def test_listing_another_merchants_customer_payment_methods_is_404(api, other_api):
    their_customer = await _customer(other_api)
    for response in (
        await api.get("/v1/payment_methods", params={"customer": their_customer}),
        await api.get(f"/v1/customers/{their_customer}/payment_methods"),
    ):
        error = _error(response, 404)
        assert error["code"] == "resource_missing"
        assert error["param"] == "customer"


async def test_another_merchants_payment_method_is_404(api, other_api):
    theirs = await card_payment_method(other_api)
    assert _error(await api.get(f"/v1/payment_methods/{theirs['id']}"), 404)["code"] == "resource_missing"
    assert theirs["id"] not in await _ids(api, "/v1/payment_methods")


async def test_update_merges_metadata_and_billing_details(api):
    pm = await card_payment_method(api)
    response = await api.post(
        f"/v1/payment_methods/{pm['id']}",
        data={"metadata[a]": "1", "billing_details[name]": "Jenny Rosen", "billing_details[address][country]": "US"},
    )
    assert response.status_code == 200, response.text
    response = await api.post(
        f"/v1/payment_methods/{pm['id']}",
        data={"metadata[a]": "", "metadata[b]": "2", "billing_details[email]": "j@x.io"},
    )
    updated = response.json()
    assert updated["metadata"] == {"b": "2"}
    assert updated["billing_details"]["name"] == "Jenny Rosen"
    assert updated["billing_details"]["email"] == "j@x.io"
    assert updated["billing_details"]["address"]["country"] == "US"
    assert updated["card"] == pm["card"]


async def test_payment_with_a_created_card_succeeds(api):
    pm = await card_payment_method(api, "378282246310005", cvc="1234")
    response = await api.post(
        "/v1/payment_intents",
        data={"amount": "1500", "currency": "usd", "payment_method": pm["id"], "confirm": "true"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert response.json()["payment_method"] == pm["id"]
    charge = (await api.get(f"/v1/charges/{response.json()['latest_charge']}")).json()
    assert charge["payment_method_details"]["card"]["last4"] == "0005"
    assert "378282246310005" not in str(charge)
