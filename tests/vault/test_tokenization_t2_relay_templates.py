"""The vault's request templates (issue 17 item 4; SECURITY.md T2, P18/P19, PCI DSS 3.4/3.5):
the api names a template and supplies non-card values; the vault alone decides where the PAN and
the CVC go. A request that tries to steer card data anywhere else is refused before the card is
opened, audited, and nothing reaches the processor.

The processor is a real local HTTP server (`capture_server`) reached over the network by the
relay, listed as a local test origin; the cards are stored through the public API."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from tests.factories import card_payment_method, create_intent
from tests.vault.capture_server import CaptureServer, capture_server

from strongroom.payments.tables import payment_methods
from strongroom.sensitive import Secret
from strongroom.vault.relay import Allowlist, CardFacts, Relay, RelayCall, RelayRefused, TemplateRefused
from strongroom.vault.relay_tables import vault_relay_audit
from strongroom.vault.templates import (
    BRAINTREE_TOKENIZE_CREDIT_CARD,
    STRIPE_PAYMENT_INTENTS_CREATE,
    CardValue,
    Encoding,
    RequestTemplate,
    TemplateRegistry,
    default_registry,
)

MASTERCARD = "5555555555554444"
CVC = "737"
STRIPE = STRIPE_PAYMENT_INTENTS_CREATE.id
STRIPE_OK = {"amount": 1000, "currency": "usd", "capture_method": "manual", "confirm": True}


@pytest.fixture
def processor() -> Iterator[CaptureServer]:
    with capture_server() as server:
        yield server


def _relay(services: Any, processor: CaptureServer) -> Relay:
    # The local server is this deployment's Stripe and Braintree: plain HTTP on loopback, allowed
    # only because it is listed, as `vault serve` allows a local test processor.
    return Relay(
        services.payments.vault,
        services.db,
        Allowlist([], local_test_origins=[processor.url]),
        timeout_s=5.0,
        templates=default_registry({"stripe": [processor.url], "braintree": [processor.url]}),
    )


async def _token(api: Any, services: Any, merchant_id: str) -> str:
    pm = await card_payment_method(api, number=MASTERCARD, cvc=CVC)
    async with services.db.read() as conn:
        query = sa.select(payment_methods.c.vault_token).where(
            payment_methods.c.merchant_id == merchant_id, payment_methods.c.id == pm["id"]
        )
        token: str = (await conn.execute(query)).scalar_one()
    return token


async def _audit(services: Any, merchant_id: str) -> list[dict[str, Any]]:
    async with services.db.read() as conn:
        query = sa.select(vault_relay_audit).where(vault_relay_audit.c.merchant_id == merchant_id)
        return [dict(r) for r in (await conn.execute(query.order_by(vault_relay_audit.c.created))).mappings()]


async def _send(services: Any, processor: CaptureServer, merchant_id: str, token: str, call: RelayCall) -> Any:
    relay = _relay(services, processor)
    try:
        return await relay.send(
            actor="connector:stripe", merchant_id=merchant_id, token=token, card=CardFacts(3, 2034), call=call
        )
    finally:
        await relay.aclose()


# Each a way a compromised api could try to steer card data, and the field the refusal names.
STEERING = [
    # The finding: the PAN into the description, the CVC into metadata.
    pytest.param(
        {**STRIPE_OK, "description": "{{card.number}}", "metadata[cvc]": "{{card.cvc}}"}, "description", id="finding"
    ),
    pytest.param({**STRIPE_OK, "metadata[n]": "{{ card.number }}"}, "metadata[n]", id="spaced-placeholder"),
    pytest.param(
        {**STRIPE_OK, "payment_method_data[card][number]": "4000000000000002"},
        "payment_method_data[card][number]",
        id="card-field",
    ),
    pytest.param(
        {**STRIPE_OK, "payment_method_data[type]": "sepa_debit"}, "payment_method_data[type]", id="fixed-value"
    ),
    pytest.param(
        {**STRIPE_OK, "transfer_data[destination]": "acct_evil"}, "transfer_data[destination]", id="outside-template"
    ),
    pytest.param({**STRIPE_OK, "metadata[x]": {"nested": "{{card.number}}"}}, "metadata[x]", id="nested-value"),
]


@pytest.mark.parametrize(("values", "param"), STEERING)
async def test_t2_pci_3_4_card_data_cannot_be_steered_into_another_field(
    api, services, merchant, processor, values, param
):
    token = await _token(api, services, merchant.id)
    with pytest.raises(TemplateRefused) as refused:
        await _send(services, processor, merchant.id, token, RelayCall(STRIPE, values, base_url=processor.url))
    assert refused.value.param == param
    assert refused.value.http_status == 403 and refused.value.code == "relay_template_refused"
    assert processor.received == []  # the processor got nothing at all
    (row,) = await _audit(services, merchant.id)
    assert (row["outcome"], row["status_code"], row["actor"], row["token"]) == (
        "template_refused",
        None,
        "connector:stripe",
        token,
    )
    assert (row["method"], row["path"]) == ("POST", "/v1/payment_intents")
    # The card was never opened: its CVC is still there for the real authorization.
    assert services.payments.vault.cvcs.take(merchant.id, token) == Secret(CVC)


async def test_t2_the_findings_raw_request_is_refused_and_audited(api, services, merchant, processor):
    """The request the review relayed, as a compromised api would send it over the vault channel
    (method, URL, body of its choosing): the vault takes templates only."""
    token = await _token(api, services, merchant.id)
    raw = {
        "method": "POST",
        "url": processor.url + "/v1/payment_intents",
        "body": "amount=1000&currency=usd&description={{card.number}}&metadata[cvc]={{card.cvc}}",
        "headers": {"content-type": "application/x-www-form-urlencoded"},
    }
    with pytest.raises(TemplateRefused):
        await _send(services, processor, merchant.id, token, RelayCall.from_wire(raw))
    assert processor.received == []
    (row,) = await _audit(services, merchant.id)
    assert (row["outcome"], row["destination"]) == ("template_refused", "template:")


@pytest.mark.parametrize(
    "headers",
    [
        {"Stripe-Account": "acct_evil"},  # another account's card data
        {"X-Card": "{{card.number}}"},
        {"Idempotency-Key": "{{card.cvc}}"},  # an allowed header, a placeholder value
        {"Content-Type": "application/json"},  # the encoding is the template's
    ],
)
async def test_t2_a_header_outside_the_template_is_refused(api, services, merchant, processor, headers):
    token = await _token(api, services, merchant.id)
    call = RelayCall(STRIPE, STRIPE_OK, headers=headers, base_url=processor.url)
    with pytest.raises(TemplateRefused) as refused:
        await _send(services, processor, merchant.id, token, call)
    assert refused.value.param == next(iter(headers))
    assert processor.received == []
    assert [r["outcome"] for r in await _audit(services, merchant.id)] == ["template_refused"]


async def test_t2_an_unknown_template_or_endpoint_is_refused(api, services, merchant, processor):
    token = await _token(api, services, merchant.id)
    with pytest.raises(TemplateRefused):
        await _send(services, processor, merchant.id, token, RelayCall("stripe.customers.create", {}))
    with pytest.raises(RelayRefused):  # the template's endpoints are the vault's, not the caller's
        await _send(
            services, processor, merchant.id, token, RelayCall(STRIPE, STRIPE_OK, base_url="https://evil.example")
        )
    assert processor.received == []
    rows = await _audit(services, merchant.id)
    assert [(r["outcome"], r["destination"]) for r in rows] == [
        ("template_refused", "template:stripe.customers.create"),
        ("refused", "template:stripe.payment_intents.create"),
    ]


async def test_t2_stripe_template_sends_the_body_stripes_api_expects(api, services, merchant, processor):
    token = await _token(api, services, merchant.id)
    values = {**STRIPE_OK, "metadata[order_id]": "ord_77", "payment_method_data[billing_details][name]": "Ada"}
    headers = {
        "Authorization": "Bearer sk_test_local",
        "Idempotency-Key": "pi_1:auth:1",
        "Stripe-Version": "2024-06-20",
    }
    answer = await _send(services, processor, merchant.id, token, RelayCall(STRIPE, values, headers, processor.url))

    (got,) = processor.received
    assert (got.method, got.path) == ("POST", "/v1/payment_intents")
    assert got.headers["content-type"] == "application/x-www-form-urlencoded"
    assert (got.headers["authorization"], got.headers["idempotency-key"], got.headers["stripe-version"]) == (
        "Bearer sk_test_local",
        "pi_1:auth:1",
        "2024-06-20",
    )
    assert sorted(urllib.parse.parse_qsl(got.body.decode(), strict_parsing=True)) == sorted(
        [
            ("amount", "1000"),
            ("currency", "usd"),
            ("capture_method", "manual"),
            ("confirm", "true"),
            ("metadata[order_id]", "ord_77"),
            ("payment_method_data[billing_details][name]", "Ada"),
            ("payment_method_data[type]", "card"),
            ("payment_method_data[card][number]", MASTERCARD),
            ("payment_method_data[card][exp_month]", "3"),
            ("payment_method_data[card][exp_year]", "2034"),
            ("payment_method_data[card][cvc]", CVC),
        ]
    )
    # PCI DSS 3.4.1: the processor echoed the card; the api gets it back masked, and no CVC.
    assert answer.status_code == 200 and MASTERCARD not in answer.body
    assert f"cvc%5D={CVC}" not in answer.body and "555555" in answer.body
    (row,) = await _audit(services, merchant.id)
    assert (row["outcome"], row["status_code"], row["path"]) == ("sent", 200, "/v1/payment_intents")


async def test_t2_braintree_template_sends_the_graphql_request_braintree_expects(api, services, merchant, processor):
    token = await _token(api, services, merchant.id)
    call = RelayCall(
        BRAINTREE_TOKENIZE_CREDIT_CARD.id,
        {"variables.input.clientMutationId": "pi_1:auth:1", "variables.input.options.validate": False},
        {"Authorization": "Basic cHViOnByaXY=", "Braintree-Version": "2019-01-01"},
        processor.url,
    )
    await _send(services, processor, merchant.id, token, call)

    (got,) = processor.received
    assert (got.method, got.path, got.headers["content-type"]) == ("POST", "/graphql", "application/json")
    assert got.headers["braintree-version"] == "2019-01-01"
    body = orjson.loads(got.body)
    assert body == {
        "query": BRAINTREE_TOKENIZE_CREDIT_CARD.fixed["query"],
        "variables": {
            "input": {
                "clientMutationId": "pi_1:auth:1",
                "creditCard": {"number": MASTERCARD, "expirationMonth": "03", "expirationYear": "2034", "cvv": CVC},
                "options": {"validate": False},
            }
        },
    }
    assert body["query"].startswith("mutation TokenizeCreditCard($input: TokenizeCreditCardInput!)")


async def test_t2_a_payment_through_the_sandbox_template_still_succeeds(api, services, merchant):
    ok = await card_payment_method(api, number=MASTERCARD, cvc=CVC)
    intent = await create_intent(api, amount=1234, payment_method=ok["id"], confirm=True)
    assert (intent["status"], intent["amount_received"]) == ("succeeded", 1234)
    declined = await card_payment_method(api, number="4000000000009995")
    error = await create_intent(api, expect=402, amount=1000, payment_method=declined["id"], confirm=True)
    assert error["error"]["decline_code"] == "insufficient_funds"  # the PAN reached the sandbox's card field
    rows = await _audit(services, merchant.id)
    assert [(r["method"], r["path"], r["outcome"], r["status_code"]) for r in rows] == [
        ("POST", "/v1/authorizations", "sent", 200),
        ("POST", "/v1/authorizations", "sent", 402),
    ]


def test_t2_a_template_cannot_open_a_card_field_to_the_caller():
    common: dict[str, Any] = {"id": "t", "connector": "t", "method": "POST", "path": "/x", "encoding": Encoding.FORM}
    card = {"card[number]": CardValue.NUMBER}
    with pytest.raises(ValueError, match="card field"):
        RequestTemplate(**common, card_fields=card, value_fields=frozenset(), value_prefixes=("card[",))
    with pytest.raises(ValueError, match="card field"):
        RequestTemplate(**common, card_fields=card, value_fields=frozenset({"card[number]"}))
    json_common = common | {"encoding": Encoding.JSON}
    with pytest.raises(ValueError, match="both a value and an object"):  # a caller's `card` replacing the card object
        RequestTemplate(**json_common, card_fields={"card.number": CardValue.NUMBER}, value_fields=frozenset({"card"}))
    with pytest.raises(ValueError, match="credentials"):
        TemplateRegistry([STRIPE_PAYMENT_INTENTS_CREATE], {"stripe": ["https://user:pw@api.example"]})
