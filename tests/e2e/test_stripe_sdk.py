"""The official `stripe` SDK (v16), unchanged, against a real server process.

Only the base address changes: `StripeClient(key, base_addresses={"api": url})`, or the global
`stripe.api_key` / `stripe.api_base`. The SDK sends form-encoded bodies with bracket notation,
`Stripe-Version`, `X-Stripe-Client-User-Agent`, and an auto-generated `Idempotency-Key` on every
POST; it raises typed errors from Stripe's error JSON. Retries are off (`max_network_retries=0`) so
each call is exactly one request, except in the test that checks retries.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import stripe

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2034, "cvc": "123"}


def client_for(server: Server, key: str | None = None, **kwargs: Any) -> stripe.StripeClient:
    kwargs.setdefault("max_network_retries", 0)
    return stripe.StripeClient(key or server.secret_key, base_addresses={"api": server.url}, **kwargs)


@pytest.fixture
def client(server: Server) -> stripe.StripeClient:
    return client_for(server)


@pytest.fixture
def other_client(server: Server) -> stripe.StripeClient:
    return client_for(server, server.other_secret_key)


def unique_email() -> str:
    return f"e2e-{secrets.token_hex(6)}@example.com"


def paid(client: stripe.StripeClient, amount: int = 2000, currency: str = "usd", **params: Any) -> stripe.PaymentIntent:
    return client.v1.payment_intents.create(
        {"amount": amount, "currency": currency, "payment_method": "pm_card_visa", "confirm": True, **params}
    )


# --- customers -----------------------------------------------------------------------------


def test_customer_create_retrieve_update_list_delete(client: stripe.StripeClient) -> None:
    email = unique_email()
    created = client.v1.customers.create({"email": email, "name": "Ada", "metadata": {"order": "6735"}})
    assert isinstance(created, stripe.Customer)
    assert created.id.startswith("cus_")
    assert (created.email, created.name, created.metadata.to_dict()) == (email, "Ada", {"order": "6735"})

    fetched = client.v1.customers.retrieve(created.id)
    assert fetched.to_dict() == created.to_dict()

    updated = client.v1.customers.update(created.id, {"name": "Grace", "metadata": {"order": "", "vip": "yes"}})
    assert updated.name == "Grace"
    assert updated.email == email
    assert updated.metadata.to_dict() == {"vip": "yes"}

    listed = client.v1.customers.list({"email": email})
    assert isinstance(listed, stripe.ListObject)
    assert [c.id for c in listed.data] == [created.id]
    assert listed.has_more is False

    deleted = client.v1.customers.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    # Like Stripe: a deleted customer is still retrievable, as a stub marked deleted.
    assert client.v1.customers.retrieve(created.id).to_dict() == {
        "id": created.id,
        "object": "customer",
        "deleted": True,
    }
    assert client.v1.customers.list({"email": email}).data == []


# --- payment methods -------------------------------------------------------------------------


def test_payment_method_create_attach_list(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create({"email": unique_email()})
    pm = client.v1.payment_methods.create(
        {"type": "card", "card": CARD, "billing_details": {"name": "Ada", "address": {"country": "GB"}}}
    )
    assert isinstance(pm, stripe.PaymentMethod)
    assert pm.id.startswith("pm_")
    assert pm.customer is None
    assert (pm.card.brand, pm.card.last4, pm.card.exp_month, pm.card.exp_year) == ("visa", "4242", 12, 2034)
    assert pm.billing_details.name == "Ada"
    # Never more than the last four digits of the number come back.
    assert "4242424242424242" not in str(pm)

    attached = client.v1.payment_methods.attach(pm.id, {"customer": customer.id})
    assert attached.customer == customer.id

    listed = client.v1.payment_methods.list({"customer": customer.id, "type": "card"})
    assert [m.id for m in listed.data] == [pm.id]
    nested = client.v1.customers.payment_methods.list(customer.id)
    assert [m.id for m in nested.data] == [pm.id]

    detached = client.v1.payment_methods.detach(pm.id)
    assert detached.customer is None
    assert client.v1.payment_methods.list({"customer": customer.id}).data == []


# --- payment intents -------------------------------------------------------------------------


def test_create_with_confirm_and_automatic_capture_succeeds(client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create({"email": unique_email()})
    pm = client.v1.payment_methods.create({"type": "card", "card": CARD})
    client.v1.payment_methods.attach(pm.id, {"customer": customer.id})

    intent = client.v1.payment_intents.create(
        {
            "amount": 2000,
            "currency": "usd",
            "customer": customer.id,
            "payment_method": pm.id,
            "confirm": True,
            "metadata": {"order_id": "6735"},
        }
    )
    assert isinstance(intent, stripe.PaymentIntent)
    assert intent.status == "succeeded"
    assert (intent.amount, intent.amount_received, intent.amount_capturable) == (2000, 2000, 0)
    assert (intent.customer, intent.payment_method) == (customer.id, pm.id)
    assert intent.metadata.to_dict() == {"order_id": "6735"}
    assert intent.latest_charge.startswith("ch_")

    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount, charge.amount_captured, charge.captured, charge.paid) == (2000, 2000, True, True)
    assert charge.payment_intent == intent.id


def test_manual_capture_then_partial_capture(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=5000, capture_method="manual")
    assert intent.status == "requires_capture"
    assert (intent.amount_capturable, intent.amount_received) == (5000, 0)

    captured = client.v1.payment_intents.capture(intent.id, {"amount_to_capture": 3000})
    assert captured.status == "succeeded"
    assert (captured.amount_received, captured.amount_capturable) == (3000, 0)
    charge = client.v1.charges.retrieve(captured.latest_charge)
    assert (charge.amount, charge.amount_captured, charge.captured) == (5000, 3000, True)


def test_manual_capture_of_the_full_amount(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=1234, capture_method="manual")
    captured = client.v1.payment_intents.capture(intent.id)
    assert (captured.status, captured.amount_received) == ("succeeded", 1234)


def test_cancel_an_uncaptured_intent(client: stripe.StripeClient) -> None:
    unconfirmed = client.v1.payment_intents.create({"amount": 700, "currency": "usd"})
    assert unconfirmed.status == "requires_payment_method"
    canceled = client.v1.payment_intents.cancel(unconfirmed.id, {"cancellation_reason": "requested_by_customer"})
    assert (canceled.status, canceled.cancellation_reason) == ("canceled", "requested_by_customer")
    assert canceled.canceled_at is not None

    authorized = paid(client, amount=900, capture_method="manual")
    released = client.v1.payment_intents.cancel(authorized.id)
    assert (released.status, released.amount_capturable, released.amount_received) == ("canceled", 0, 0)

    with pytest.raises(stripe.InvalidRequestError) as exc:
        client.v1.payment_intents.capture(released.id)
    assert exc.value.http_status == 400
    assert exc.value.code == "payment_intent_unexpected_state"


def test_confirm_separately(client: stripe.StripeClient) -> None:
    intent = client.v1.payment_intents.create({"amount": 2500, "currency": "eur"})
    assert intent.status == "requires_payment_method"
    updated = client.v1.payment_intents.update(intent.id, {"payment_method": "pm_card_mastercard"})
    assert updated.status == "requires_confirmation"
    confirmed = client.v1.payment_intents.confirm(intent.id)
    assert (confirmed.status, confirmed.amount_received, confirmed.currency) == ("succeeded", 2500, "eur")

    later = client.v1.payment_intents.create({"amount": 300, "currency": "usd"})
    confirmed = client.v1.payment_intents.confirm(later.id, {"payment_method": "pm_card_visa"})
    assert confirmed.status == "succeeded"


@pytest.mark.parametrize(
    ("payment_method", "code", "decline_code", "message"),
    [
        ("pm_card_chargeDeclinedInsufficientFunds", "card_declined", "insufficient_funds", "insufficient funds"),
        ("pm_card_chargeDeclined", "card_declined", "generic_decline", "declined"),
        ("pm_card_chargeDeclinedLostCard", "card_declined", "lost_card", "declined"),
        ("pm_card_chargeDeclinedExpiredCard", "expired_card", "expired_card", "expired"),
        ("pm_card_chargeDeclinedIncorrectCvc", "incorrect_cvc", "incorrect_cvc", "security code"),
    ],
)
def test_decline_raises_card_error(
    client: stripe.StripeClient, payment_method: str, code: str, decline_code: str, message: str
) -> None:
    with pytest.raises(stripe.CardError) as raised:
        paid(client, amount=4200, payment_method=payment_method)
    exc = raised.value
    assert exc.http_status == 402
    assert exc.code == code
    assert exc.error is not None
    assert exc.error.type == "card_error"
    assert exc.error.decline_code == decline_code
    assert exc.user_message is not None
    assert message in exc.user_message
    assert exc.request_id is not None
    assert exc.request_id.startswith("req_")
    # Stripe puts the failed intent in the error; it can be paid again with another card.
    failed = exc.error.payment_intent
    assert failed is not None
    assert failed.status == "requires_payment_method"
    assert failed.last_payment_error.decline_code == decline_code
    retried = client.v1.payment_intents.confirm(failed.id, {"payment_method": "pm_card_visa"})
    assert retried.status == "succeeded"


def test_invalid_request_names_the_param(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as negative:
        client.v1.payment_intents.create({"amount": -1, "currency": "usd"})
    assert (negative.value.http_status, negative.value.param) == (400, "amount")

    with pytest.raises(stripe.InvalidRequestError) as currency:
        client.v1.payment_intents.create({"amount": 100, "currency": "xyz"})
    assert currency.value.param == "currency"

    with pytest.raises(stripe.InvalidRequestError) as unknown:
        client.v1.customers.create({"email": unique_email(), "bogus": "1"})  # type: ignore[typeddict-unknown-key]
    assert (unknown.value.code, unknown.value.param) == ("parameter_unknown", "bogus")


def test_bad_key_raises_authentication_error(server: Server) -> None:
    bogus = client_for(server, "sk_test_" + secrets.token_urlsafe(24))
    with pytest.raises(stripe.AuthenticationError) as exc:
        bogus.v1.customers.list()
    assert exc.value.http_status == 401


def test_unknown_id_is_invalid_request_404(client: stripe.StripeClient) -> None:
    for call in (
        lambda: client.v1.payment_intents.retrieve("pi_doesnotexist"),
        lambda: client.v1.customers.retrieve("cus_doesnotexist"),
        lambda: client.v1.refunds.retrieve("re_doesnotexist"),
        lambda: client.v1.payment_intents.capture("pi_doesnotexist"),
    ):
        with pytest.raises(stripe.InvalidRequestError) as exc:
            call()
        assert exc.value.http_status == 404
        assert exc.value.code == "resource_missing"


def test_other_merchants_objects_are_404(client: stripe.StripeClient, other_client: stripe.StripeClient) -> None:
    customer = client.v1.customers.create({"email": unique_email()})
    pm = client.v1.payment_methods.create({"type": "card", "card": CARD})
    intent = paid(client)
    refund = client.v1.refunds.create({"payment_intent": intent.id, "amount": 100})
    for call in (
        lambda: other_client.v1.customers.retrieve(customer.id),
        lambda: other_client.v1.customers.update(customer.id, {"name": "Mallory"}),
        lambda: other_client.v1.customers.delete(customer.id),
        lambda: other_client.v1.payment_methods.retrieve(pm.id),
        lambda: other_client.v1.payment_methods.attach(pm.id, {"customer": customer.id}),
        lambda: other_client.v1.payment_intents.retrieve(intent.id),
        lambda: other_client.v1.payment_intents.cancel(intent.id),
        lambda: other_client.v1.charges.retrieve(intent.latest_charge),
        lambda: other_client.v1.refunds.retrieve(refund.id),
        lambda: other_client.v1.refunds.create({"payment_intent": intent.id}),
    ):
        with pytest.raises(stripe.InvalidRequestError) as exc:
            call()
        assert exc.value.http_status == 404
    assert intent.id not in {i.id for i in other_client.v1.payment_intents.list({"limit": 100}).data}
    # Untouched by the other merchant's attempts.
    assert client.v1.customers.retrieve(customer.id).name is None
    assert client.v1.charges.retrieve(intent.latest_charge).amount_refunded == 100


# --- refunds ---------------------------------------------------------------------------------


def test_full_refund(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=1500)
    refund = client.v1.refunds.create({"payment_intent": intent.id, "reason": "requested_by_customer"})
    assert isinstance(refund, stripe.Refund)
    assert (refund.amount, refund.status, refund.reason) == (1500, "succeeded", "requested_by_customer")
    assert (refund.payment_intent, refund.charge) == (intent.id, intent.latest_charge)
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (1500, True)
    with pytest.raises(stripe.InvalidRequestError) as again:
        client.v1.refunds.create({"payment_intent": intent.id})
    assert again.value.code == "charge_already_refunded"


def test_several_partial_refunds_then_over_refund(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=2000)
    amounts = [500, 700]
    refunds = [client.v1.refunds.create({"charge": intent.latest_charge, "amount": a}) for a in amounts]
    assert [r.amount for r in refunds] == amounts
    assert client.v1.charges.retrieve(intent.latest_charge).amount_refunded == 1200

    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create({"payment_intent": intent.id, "amount": 801})
    assert (over.value.http_status, over.value.param) == (400, "amount")

    rest = client.v1.refunds.create({"payment_intent": intent.id})
    assert rest.amount == 800
    listed = client.v1.refunds.list({"payment_intent": intent.id})
    assert sorted(r.id for r in listed.data) == sorted(r.id for r in [*refunds, rest])
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.amount_refunded, charge.refunded) == (2000, True)

    updated = client.v1.refunds.update(rest.id, {"metadata": {"ticket": "T-1"}})
    assert updated.metadata.to_dict() == {"ticket": "T-1"}


# --- lists, idempotency, events, expand ------------------------------------------------------


def test_auto_paging_iter_over_25_objects(client: stripe.StripeClient) -> None:
    email = unique_email()
    created = [client.v1.customers.create({"email": email, "name": f"n{i}"}).id for i in range(25)]
    first = client.v1.customers.list({"email": email, "limit": 10})
    assert len(first.data) == 10
    assert first.has_more is True
    seen = [c.id for c in first.auto_paging_iter()]
    # Newest first, every object exactly once across three pages.
    assert seen == list(reversed(created))

    customer = client.v1.customers.create({"email": unique_email()})
    intents = [
        client.v1.payment_intents.create({"amount": 100 + i, "currency": "usd", "customer": customer.id}).id
        for i in range(25)
    ]
    paged = client.v1.payment_intents.list({"customer": customer.id, "limit": 7})
    assert [i.id for i in paged.auto_paging_iter()] == list(reversed(intents))
    # Backwards from the oldest: ending_before pages towards newer objects.
    backwards = client.v1.payment_intents.list({"customer": customer.id, "limit": 7, "ending_before": intents[0]})
    assert [i.id for i in backwards.auto_paging_iter()] == intents[1:]


def test_idempotency_key_replays_the_same_object_with_one_charge(client: stripe.StripeClient) -> None:
    key = "e2e-" + secrets.token_hex(12)
    params: Any = {"amount": 3100, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
    first = client.v1.payment_intents.create(params, {"idempotency_key": key})
    replay = client.v1.payment_intents.create(params, {"idempotency_key": key})
    assert replay.to_dict() == first.to_dict()
    assert replay.last_response is not None
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"
    charges = client.v1.charges.list({"payment_intent": first.id})
    assert [c.id for c in charges.data] == [first.latest_charge]

    # The same key with other parameters is refused, and never retried by the SDK.
    with pytest.raises(stripe.IdempotencyError):
        client.v1.payment_intents.create({**params, "amount": 3200}, {"idempotency_key": key})
    # Without a key the SDK generates a fresh one per call: two calls, two payments.
    assert paid(client).id != paid(client).id


class LosesFirstPostResponse(stripe.RequestsClient):
    """The SDK's own HTTP client, recording what it sends, that drops the answer to the first POST
    after the server has handled it: a connection lost at the worst moment."""

    def __init__(self) -> None:
        super().__init__(timeout=30)
        self.sent: list[tuple[str, dict[str, str]]] = []
        self.lost = False

    def request(self, method: str, url: str, headers: Any, post_data: Any = None) -> Any:
        self.sent.append((method.lower(), dict(headers or {})))
        response = super().request(method, url, headers, post_data)
        if method.lower() == "post" and not self.lost:
            self.lost = True
            raise stripe.APIConnectionError("response lost after the server handled the request", should_retry=True)
        return response


def test_sdk_retry_after_a_lost_response_replays_instead_of_paying_twice(server: Server) -> None:
    """The SDK puts an auto-generated Idempotency-Key on every POST and reuses it when it retries:
    the retry is answered from the stored result, so the customer pays once."""
    http = LosesFirstPostResponse()
    client = client_for(server, max_network_retries=2, http_client=http)
    customer = client_for(server).v1.customers.create({"email": unique_email()})

    intent = paid(client, amount=3700, customer=customer.id)

    posts = [headers for method, headers in http.sent if method == "post"]
    assert len(posts) == 2
    key = posts[0]["Idempotency-Key"]
    assert key
    assert posts[1]["Idempotency-Key"] == key
    assert intent.status == "succeeded"
    assert intent.last_response is not None
    assert intent.last_response.headers.get("Idempotent-Replayed") == "true"
    intents = client.v1.payment_intents.list({"customer": customer.id})
    assert [i.id for i in intents.data] == [intent.id]
    assert len(client.v1.charges.list({"payment_intent": intent.id}).data) == 1

    # Everything else the SDK adds was accepted as sent.
    first = posts[0]
    assert first["Stripe-Version"] == stripe.api_version
    assert first["Content-Type"] == "application/x-www-form-urlencoded"
    assert first["User-Agent"].startswith("Stripe/v1 PythonBindings/")
    assert json.loads(first["X-Stripe-Client-User-Agent"])["bindings_version"] == stripe.VERSION


def test_sdk_per_request_options_are_accepted(server: Server) -> None:
    """A pinned Stripe-Version (client-wide and per request), extra headers, a per-request api_key."""
    pinned = client_for(server, stripe_version="2024-06-20")
    customer = pinned.v1.customers.create(
        {"email": unique_email()}, {"headers": {"X-Request-Source": "e2e"}, "stripe_version": "2025-01-27.acacia"}
    )
    assert customer.last_response is not None
    assert customer.last_response.code == 200
    assert customer.last_response.request_id is not None
    assert customer.last_response.request_id.startswith("req_")
    assert pinned.v1.customers.retrieve(customer.id).id == customer.id
    other = pinned.v1.customers.list(options={"api_key": server.other_secret_key})
    assert customer.id not in {c.id for c in other.data}
    with pytest.raises(stripe.InvalidRequestError) as hidden:
        pinned.v1.customers.retrieve(customer.id, options={"api_key": server.other_secret_key})
    assert hidden.value.http_status == 404


def test_events_list_contains_payment_intent_succeeded(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=4321)
    events = client.v1.events.list({"type": "payment_intent.succeeded", "limit": 5})
    matching = [e for e in events.auto_paging_iter() if e.data.object["id"] == intent.id]
    assert len(matching) == 1
    event = client.v1.events.retrieve(matching[0].id)
    assert isinstance(event, stripe.Event)
    assert event.type == "payment_intent.succeeded"
    assert event.data.object["status"] == "succeeded"
    assert event.data.object["amount"] == 4321


def test_expand_latest_charge_returns_a_charge(client: stripe.StripeClient) -> None:
    intent = paid(client, amount=2600, expand=["latest_charge"])
    assert isinstance(intent.latest_charge, stripe.Charge)
    assert (intent.latest_charge.object, intent.latest_charge.amount) == ("charge", 2600)

    fetched = client.v1.payment_intents.retrieve(intent.id, {"expand": ["latest_charge"]})
    assert isinstance(fetched.latest_charge, stripe.Charge)
    assert fetched.latest_charge.id == intent.latest_charge.id
    assert fetched.latest_charge.payment_intent == intent.id
    assert isinstance(client.v1.payment_intents.retrieve(intent.id).latest_charge, str)


@pytest.mark.parametrize(("currency", "amount"), [("jpy", 500), ("kwd", 1234), ("usd", 50)])
def test_zero_and_three_decimal_currencies(client: stripe.StripeClient, currency: str, amount: int) -> None:
    """Amounts are minor units as given: 500 JPY is ¥500 (not times 100), 1234 KWD is 1.234 KD."""
    intent = paid(client, amount=amount, currency=currency)
    assert (intent.status, intent.currency, intent.amount_received) == ("succeeded", currency, amount)
    charge = client.v1.charges.retrieve(intent.latest_charge)
    assert (charge.currency, charge.amount, charge.amount_captured) == (currency, amount, amount)
    part = amount // 5
    refund = client.v1.refunds.create({"payment_intent": intent.id, "amount": part})
    assert (refund.amount, refund.currency) == (part, currency)
    with pytest.raises(stripe.InvalidRequestError) as over:
        client.v1.refunds.create({"payment_intent": intent.id, "amount": amount - part + 1})
    assert over.value.param == "amount"


# --- the global (module-level) style --------------------------------------------------------


@pytest.fixture
def global_stripe(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(stripe, "api_key", server.secret_key)
    monkeypatch.setattr(stripe, "api_base", server.url)
    monkeypatch.setattr(stripe, "max_network_retries", 0)
    yield


@pytest.mark.usefixtures("global_stripe")
def test_global_api_key_and_api_base() -> None:
    email = unique_email()
    customer = stripe.Customer.create(email=email, metadata={"source": "global"})
    assert stripe.Customer.retrieve(customer.id).email == email
    modified = stripe.Customer.modify(customer.id, name="Global")
    assert modified.name == "Global"
    assert [c.id for c in stripe.Customer.list(email=email).data] == [customer.id]

    intent = stripe.PaymentIntent.create(
        amount=1999, currency="usd", customer=customer.id, payment_method="pm_card_visa", confirm=True
    )
    assert intent.status == "succeeded"
    manual = stripe.PaymentIntent.create(
        amount=800, currency="usd", payment_method="pm_card_visa", confirm=True, capture_method="manual"
    )
    assert stripe.PaymentIntent.capture(manual.id, amount_to_capture=500).amount_received == 500
    refund = stripe.Refund.create(payment_intent=intent.id, amount=999, idempotency_key="g-" + secrets.token_hex(8))
    assert refund.amount == 999
    with pytest.raises(stripe.CardError) as declined:
        stripe.PaymentIntent.create(
            amount=1000, currency="usd", payment_method="pm_card_chargeDeclinedInsufficientFunds", confirm=True
        )
    assert declined.value.error is not None
    assert declined.value.error.decline_code == "insufficient_funds"
    assert stripe.Customer.delete(customer.id).deleted is True
