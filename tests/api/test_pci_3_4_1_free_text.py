"""PCI DSS 3.4.1 / 3.5.1 (SECURITY.md P2, P3): a card number outside the card fields is refused.

Every parameter of every route but `card[number]` (where the vault takes a PAN) refuses a value,
or a name, holding a PAN in any of the ways people write one, with Stripe's 400 naming the
parameter, before anything is written. False refusals matter as much: phone numbers, order ids,
UUIDs, random keys, dates, timestamps and amounts are never refused.
"""

from __future__ import annotations

import datetime as dt
import uuid

import httpx
import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from tests.conftest import Merchant

from strongroom.api.http import Services
from strongroom.errors import InvalidRequest
from strongroom.idempotency import service as idempotency
from strongroom.payments.tables import customers, payment_intents, payment_methods
from strongroom.redact import holds_pan

DISCOVER = "6011111111111117"
VISA_GROUPS = ("4242", "4242", "4242", "4242")
WRITTEN = [
    DISCOVER,
    " ".join(VISA_GROUPS),
    ".".join(VISA_GROUPS),
    "_".join(VISA_GROUPS),
    "\t".join(VISA_GROUPS),
    "  ".join(VISA_GROUPS),
    "--".join(VISA_GROUPS),
    "3782-822463-10005",
]
INTENT = {"amount": "2000", "currency": "usd"}
CASES = [
    ("POST", "/v1/customers", "description", {}),
    ("POST", "/v1/customers", "name", {}),
    ("POST", "/v1/customers", "phone", {}),
    ("POST", "/v1/customers", "email", {}),
    ("POST", "/v1/customers", "metadata[note]", {}),
    ("POST", "/v1/payment_intents", "description", INTENT),
    ("POST", "/v1/payment_intents", "metadata[order]", INTENT),
    ("POST", "/v1/payment_intents", "return_url", INTENT),
    ("POST", "/v1/payment_intents", "receipt_email", INTENT),
    ("POST", "/v1/payment_intents", "statement_descriptor", INTENT),
    ("POST", "/v1/payment_methods", "billing_details[name]", {"type": "card", "card[token]": "tok_visa"}),
    ("POST", "/v1/payment_methods", "billing_details[address][line1]", {"type": "card", "card[token]": "tok_visa"}),
    ("GET", "/v1/events", "type", {}),
    ("GET", "/v1/customers", "email", {}),
]


async def _rows(services: Services, merchant_id: str) -> list[int]:
    counts = []
    async with services.db.read() as conn:
        for table in (customers, payment_intents, payment_methods):
            query = sa.select(sa.func.count()).select_from(table).where(table.c.merchant_id == merchant_id)
            counts.append(int((await conn.execute(query)).scalar_one()))
    return counts


def _assert_refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "card number" in error["message"]


def _email_or_value(param: str, pan: str) -> str:
    return f"{pan}@example.com" if param.endswith("email") else f"ref {pan}"


@pytest.mark.parametrize(("method", "path", "param", "others"), CASES)
@pytest.mark.parametrize("pan", WRITTEN)
async def test_pci_3_4_1_pan_in_a_free_text_parameter_is_refused_and_nothing_is_written(
    api: httpx.AsyncClient,
    services: Services,
    merchant: Merchant,
    method: str,
    path: str,
    param: str,
    others: dict[str, str],
    pan: str,
) -> None:
    before = await _rows(services, merchant.id)
    data = {**others, param: _email_or_value(param, pan)}
    if method == "GET":
        response = await api.get(path, params=data)
    else:
        response = await api.post(path, data=data, headers={"Idempotency-Key": str(uuid.uuid4())})
    _assert_refused(response, param)
    assert await _rows(services, merchant.id) == before


async def test_pci_3_4_1_pan_as_a_metadata_key_or_json_number_is_refused(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    before = await _rows(services, merchant.id)
    as_key = await api.post("/v1/customers", data={f"metadata[pan {DISCOVER}]": "x"})
    _assert_refused(as_key, "metadata[pan 601111******1117]")  # the name is masked on its way out
    body = orjson.dumps({"metadata": {"n": int(DISCOVER)}})
    as_number = await api.post("/v1/customers", content=body, headers={"Content-Type": "application/json"})
    _assert_refused(as_number, "metadata[n]")
    assert await _rows(services, merchant.id) == before
    assert DISCOVER not in as_key.text + as_number.text


async def test_pci_3_4_1_card_number_field_is_the_only_one_exempt(api: httpx.AsyncClient) -> None:
    card = {"type": "card", "card[exp_month]": "12", "card[exp_year]": "2040", "card[cvc]": "123"}
    stored = await api.post("/v1/payment_methods", data={**card, "card[number]": " ".join(VISA_GROUPS)})
    assert stored.status_code == 200, stored.text
    assert stored.json()["card"]["last4"] == "4242"
    # A field named like the card field on a route that takes no card is still no way in: its
    # model refuses it as unknown, before anything is written.
    elsewhere = await api.post("/v1/customers", data={"card[number]": DISCOVER})
    assert elsewhere.status_code == 400
    assert elsewhere.json()["error"]["code"] == "parameter_unknown"


@pytest.mark.parametrize("key", ["order-4242.4242.4242.4242", "retry_6011111111111117", "k 3782 822463 10005"])
async def test_pci_3_4_1_idempotency_key_holding_a_pan_is_refused(api: httpx.AsyncClient, key: str) -> None:
    response = await api.post("/v1/customers", data={"name": "x"}, headers={"Idempotency-Key": key})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "idempotency_key_invalid"


# --- no false refusals -------------------------------------------------------------------------

# E.164 country codes with their longest national significant numbers (ITU-T E.164 national
# plans): among them the 13- and 14-digit numbers that start like a card (Germany +49, China +86,
# Indonesia +62, Brazil +55) and the 15-digit maximum (Austria +43).
COUNTRIES = [
    ("1", 10), ("7", 10), ("20", 10), ("27", 9), ("30", 10), ("31", 9), ("33", 9), ("34", 9),
    ("36", 9), ("39", 11), ("43", 13), ("44", 10), ("49", 11), ("52", 10), ("55", 11), ("61", 9),
    ("62", 12), ("65", 8), ("81", 10), ("86", 11), ("91", 10), ("234", 10), ("353", 9), ("372", 8),
    ("380", 9), ("852", 8), ("971", 9),
]  # fmt: skip


@st.composite
def phone_numbers(draw: st.DrawFn) -> str:
    code, length = draw(st.sampled_from(COUNTRIES))
    national = draw(st.text("0123456789", min_size=length - 2, max_size=length))
    spaced = draw(st.booleans())
    return f"+{code} {national[:3]} {national[3:]}" if spaced else f"+{code}{national}"


order_ids = st.one_of(
    st.from_regex(r"\A(ORD|order|inv|#)[-_]?[0-9]{1,12}\Z"),
    st.from_regex(r"\AORD-20[0-9]{2}-[01][0-9]-[0-3][0-9]-[0-9]{1,6}\Z"),
    st.from_regex(r"\Aorder_[0-9]{20,40}\Z"),
)
uuids = st.uuids().flatmap(lambda u: st.sampled_from([str(u), u.hex, str(u).upper(), f"urn:uuid:{u}"]))
hex_keys = st.binary(min_size=16, max_size=32).map(bytes.hex)
# Timestamps of this century's first decades: unix microseconds from 2040 on start with 2221
# and up, a Mastercard prefix, and are indistinguishable from a card number.
moments = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2037, 12, 31), timezones=st.just(dt.UTC)
)
timestamps = moments.flatmap(
    lambda t: st.sampled_from(
        [
            t.isoformat(),
            t.isoformat(sep=" "),
            t.date().isoformat(),
            str(int(t.timestamp())),
            str(int(t.timestamp() * 1000)),
            str(int(t.timestamp() * 1_000_000)),
        ]
    )
)
# Amounts up to ten billion in the major unit, in minor units or written out.
amounts = st.integers(0, 10**12 - 1).flatmap(
    lambda n: st.sampled_from([str(n), f"{n / 100:.2f}", f"{n / 100:,.2f}", f"USD {n // 100}.{n % 100:02d}"])
)


@given(value=st.one_of(phone_numbers(), order_ids, uuids, hex_keys, timestamps, amounts))
def test_pci_3_4_1_phones_ids_uuids_keys_dates_and_amounts_are_never_refused(value: str) -> None:
    assert not holds_pan(value), value
    assert not holds_pan(f"note: {value}, {value}")


@given(key=st.one_of(uuids, hex_keys, order_ids))
def test_i1_random_and_structured_idempotency_keys_are_never_refused(key: str) -> None:
    assert idempotency.validate_key(key, 255) == key


def test_a_pan_still_refused_as_a_key_proves_the_property_can_fail() -> None:
    with pytest.raises(InvalidRequest):
        idempotency.validate_key("order-" + DISCOVER, 255)


@pytest.mark.parametrize(
    "value",
    ["+4915123456789", "+86 138 00138000", "550e8400-e29b-41d4-a716-446655440000", "2026-11-24T10:00:00.123456+00:00"],
)
async def test_pci_3_4_1_realistic_values_are_stored_through_the_api(api: httpx.AsyncClient, value: str) -> None:
    response = await api.post("/v1/customers", data={"phone": value, "metadata[ref]": value, "description": value})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"ref": value}
