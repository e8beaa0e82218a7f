"""Random sequences of operations on a merchant's payment intents (up to three, in usd, jpy and
kwd), checked step by step against a model of Stripe's state machine (hypothesis.stateful).

Operations: confirm (a succeeding, a declined or a 3-D Secure card, or none), complete or fail
3-D Secure (with the current or a used token), capture (all, part, or more than capturable),
cancel, refund (all, part, or more than is left), update the amount, and any operation in a status
that forbids it. After every step the API, the charges and the processor must agree with the model
(refunded never above received); a refused operation must answer 400 (404 for a used 3-D Secure
token) and change nothing, not even the event log.

Hypothesis' state machines are synchronous, so the machine drives a second instance of the app
(`create_app` on the session's database) on an event loop of its own, in a background thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, assume
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test
from tests.conftest import new_merchant

from strongroom.api.http import Services
from strongroom.app import create_app
from strongroom.settings import Settings

T = TypeVar("T")

MINIMUM = {"usd": 50, "jpy": 50, "kwd": 1}
AMOUNT_MAX = 6000
CARDS = {"success": "pm_card_visa", "decline": "pm_card_chargeDeclined", "3ds": "pm_card_threeDSecureRequired"}
INTENTS_MAX = 3
STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "succeeded",
    "canceled",
)
CONFIRMABLE = {"requires_payment_method", "requires_confirmation"}
UPDATABLE = {*CONFIRMABLE, "requires_action"}
CANCELABLE = {*UPDATABLE, "requires_capture"}
# Stripe's state machine: which statuses allow each operation.
ALLOWED = {
    "confirm": CONFIRMABLE,
    "update": UPDATABLE,
    "capture": {"requires_capture"},
    "cancel": CANCELABLE,
    "refund": {"succeeded"},
}
UNEXPECTED_STATE = {"code": "payment_intent_unexpected_state"}

# An amount for capture or refund: the default (none), an absolute one, or one relative to what
# is capturable/refundable (exactly all of it, one minor unit less or more), to hit the boundaries.
portions = st.one_of(st.none(), st.integers(1, AMOUNT_MAX), st.sampled_from(["all", "one less", "one more"]))


class Driver:
    """A second app instance on its own event loop; `run` executes a coroutine there."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="state-machine-loop", daemon=True)
        self._thread.start()
        self._app = create_app(settings, background=False)
        self._lifespan = self._app.router.lifespan_context(self._app)
        self.run(self._lifespan.__aenter__())
        self.services: Services = self._app.state.services

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def client(self, secret_key: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self._app)
        headers = {"Authorization": f"Bearer {secret_key}"}
        return httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers)

    def close(self) -> None:
        try:
            self.run(self._lifespan.__aexit__(None, None, None))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()


@pytest.fixture(scope="module")
def driver(settings: Settings) -> Iterator[Driver]:
    running = Driver(settings)
    yield running
    running.close()


@dataclass
class Model:
    """What Stripe's documentation says the intent should look like."""

    amount: int
    currency: str
    manual: bool
    status: str = "requires_payment_method"
    card: str | None = None  # the attached payment method's kind
    capturable: int = 0
    received: int = 0
    refunded: int = 0
    authorizations: int = 0  # successful authorizations at the processor
    charges: int = 0
    token: str | None = None  # the current 3-D Secure token
    used_tokens: list[str] = field(default_factory=list)

    def authorized(self) -> None:
        self.authorizations += 1
        self.charges += 1
        if self.manual:
            self.status, self.capturable = "requires_capture", self.amount
        else:
            self.status, self.received = "succeeded", self.amount

    def failed(self) -> None:
        self.status, self.card = "requires_payment_method", None

    def leave_action(self) -> None:
        if self.token is not None:
            self.used_tokens.append(self.token)
            self.token = None


def resolve(portion: int | str | None, whole: int) -> int | None:
    if portion == "all":
        return whole
    if portion == "one less":
        return whole - 1
    if portion == "one more":
        return whole + 1
    assert not isinstance(portion, str)
    return portion


class IntentMachine(RuleBasedStateMachine):
    """A merchant with up to `INTENTS_MAX` intents. Each rule acts on an intent in a status that
    allows the operation (it may still be refused for its amount); `wrong_status` tries an
    operation on an intent whose status forbids it."""

    def __init__(self, driver: Driver) -> None:
        super().__init__()
        self.driver = driver
        self.models: dict[str, Model] = {}
        merchant = driver.run(new_merchant(driver.services, "State machine"))
        self.merchant_id = merchant.id
        self.api = driver.client(merchant.secret_key)

    def teardown(self) -> None:
        self.driver.run(self.api.aclose())

    # --- plumbing ---------------------------------------------------------------------------

    def call(self, method: str, path: str, data: dict[str, Any] | None = None) -> httpx.Response:
        form = {k: str(v) for k, v in (data or {}).items() if v is not None}
        if method == "GET":
            return self.driver.run(self.api.get(path, params=form))
        return self.driver.run(self.api.post(path, data=form))

    def intent(self, intent_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.call("GET", f"/v1/payment_intents/{intent_id}").json()
        return body

    def charges(self, intent_id: str) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.call("GET", "/v1/charges", {"payment_intent": intent_id}).json()["data"]
        return data

    def snapshot(self, intent_id: str) -> dict[str, Any]:
        return {
            "intent": self.intent(intent_id),
            "charges": self.charges(intent_id),
            "refunds": self.call("GET", "/v1/refunds", {"payment_intent": intent_id}).json()["data"],
            "events": [e["id"] for e in self.call("GET", "/v1/events", {"limit": 100}).json()["data"]],
        }

    def refused(self, before: dict[str, Any], response: httpx.Response, status: int, **error: str) -> None:
        assert response.status_code == status, response.text
        body = response.json()["error"]
        assert {k: body.get(k) for k in error} == error, body
        assert self.snapshot(before["intent"]["id"]) == before

    def having(self, statuses: Iterable[str]) -> list[str]:
        return [intent_id for intent_id, m in self.models.items() if m.status in statuses]

    def pick(self, data: st.DataObject, statuses: Iterable[str]) -> tuple[str, Model]:
        intent_id = data.draw(st.sampled_from(self.having(statuses)), label="intent")
        return intent_id, self.models[intent_id]

    def confirmed(self, m: Model, used: str, response: httpx.Response) -> None:
        """Applies the outcome of confirming with a card of kind `used` to the model."""
        m.card = used
        if used == "decline":
            assert response.status_code == 402, response.text
            assert response.json()["error"]["decline_code"] == "generic_decline"
            m.charges += 1
            m.failed()
        elif used == "3ds":
            assert response.status_code == 200, response.text
            m.status = "requires_action"
            url = urlsplit(response.json()["next_action"]["redirect_to_url"]["url"])
            m.token = parse_qs(url.query)["token"][0]
        else:
            assert response.status_code == 200, response.text
            m.authorized()

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: len(self.models) < INTENTS_MAX)
    @rule(
        money=st.sampled_from(sorted(MINIMUM)).flatmap(
            lambda c: st.tuples(st.just(c), st.integers(MINIMUM[c], AMOUNT_MAX))
        ),
        manual=st.booleans(),
        card=st.sampled_from([None, *CARDS]),
        confirm=st.booleans(),
    )
    def create(self, money: tuple[str, int], manual: bool, card: str | None, confirm: bool) -> None:
        currency, amount = money
        m = Model(amount=amount, currency=currency, manual=manual)
        params: dict[str, Any] = {"amount": amount, "currency": currency}
        params["capture_method"] = "manual" if manual else "automatic"
        if card is not None:
            params["payment_method"] = CARDS[card]
            m.status, m.card = "requires_confirmation", card
        if card is not None and confirm:
            response = self.call("POST", "/v1/payment_intents", {**params, "confirm": "true"})
            body = response.json()
            intent_id = body["error"]["payment_intent"]["id"] if response.status_code == 402 else body["id"]
            self.confirmed(m, card, response)
        else:
            response = self.call("POST", "/v1/payment_intents", params)
            assert response.status_code == 200, response.text
            intent_id = response.json()["id"]
        self.models[intent_id] = m

    @precondition(lambda self: self.having(CONFIRMABLE))
    @rule(data=st.data(), card=st.sampled_from([None, *CARDS]))
    def confirm(self, data: st.DataObject, card: str | None) -> None:
        intent_id, m = self.pick(data, CONFIRMABLE)
        before = self.snapshot(intent_id)
        pm = CARDS[card] if card else None
        response = self.call("POST", f"/v1/payment_intents/{intent_id}/confirm", {"payment_method": pm})
        used = card or m.card
        if used is None:
            return self.refused(before, response, 400, param="payment_method")
        return self.confirmed(m, used, response)

    @precondition(lambda self: any(m.token or m.used_tokens for m in self.models.values()))
    @rule(data=st.data(), succeed=st.booleans())
    def authenticate(self, data: st.DataObject, succeed: bool) -> None:
        with_tokens = [i for i, m in self.models.items() if m.token or m.used_tokens]
        intent_id = data.draw(st.sampled_from(with_tokens), label="intent")
        m = self.models[intent_id]
        token = data.draw(st.sampled_from([t for t in [m.token, *m.used_tokens] if t]), label="token")
        before = self.snapshot(intent_id)
        path = f"/v1/sandbox/3ds/{self.merchant_id}/{intent_id}"
        form = {"token": token, "result": "succeeded" if succeed else "failed"}
        response = self.driver.run(self.api.post(path, data=form))
        if token != m.token:
            return self.refused(before, response, 404)
        assert response.status_code == 200, response.text
        m.leave_action()
        if succeed:
            m.authorized()
        else:
            m.failed()
            assert self.intent(intent_id)["last_payment_error"]["code"] == "payment_intent_authentication_failure"
        return None

    @precondition(lambda self: self.having({"requires_capture"}))
    @rule(data=st.data(), portion=portions)
    def capture(self, data: st.DataObject, portion: int | str | None) -> None:
        intent_id, m = self.pick(data, {"requires_capture"})
        before = self.snapshot(intent_id)
        amount = resolve(portion, m.capturable)
        response = self.call("POST", f"/v1/payment_intents/{intent_id}/capture", {"amount_to_capture": amount})
        if amount is not None and not 1 <= amount <= m.capturable:
            return self.refused(before, response, 400, param="amount_to_capture")
        assert response.status_code == 200, response.text
        m.status, m.received, m.capturable = "succeeded", m.capturable if amount is None else amount, 0
        return None

    @precondition(lambda self: self.having(CANCELABLE))
    @rule(data=st.data(), reason=st.sampled_from([None, "duplicate", "requested_by_customer", "abandoned"]))
    def cancel(self, data: st.DataObject, reason: str | None) -> None:
        intent_id, m = self.pick(data, CANCELABLE)
        response = self.call("POST", f"/v1/payment_intents/{intent_id}/cancel", {"cancellation_reason": reason})
        assert response.status_code == 200, response.text
        assert response.json()["cancellation_reason"] == reason
        m.status, m.capturable = "canceled", 0
        m.leave_action()

    @precondition(lambda self: self.having({"succeeded"}))
    @rule(data=st.data(), portion=portions, by_charge=st.booleans())
    def refund(self, data: st.DataObject, portion: int | str | None, by_charge: bool) -> None:
        intent_id, m = self.pick(data, {"succeeded"})
        before = self.snapshot(intent_id)
        available = m.received - m.refunded
        amount = resolve(portion, available)
        target = {"charge": before["intent"]["latest_charge"]} if by_charge else {"payment_intent": intent_id}
        response = self.call("POST", "/v1/refunds", {**target, "amount": amount})
        if amount is not None and amount < 0:
            return self.refused(before, response, 400, param="amount")  # not even an integer amount
        if available == 0:
            return self.refused(before, response, 400, code="charge_already_refunded")
        if amount is not None and amount < 1:
            return self.refused(before, response, 400, param="amount", code="amount_too_small")
        if amount is not None and amount > available:
            return self.refused(before, response, 400, param="amount", code="amount_too_large")
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "succeeded"
        m.refunded += available if amount is None else amount
        return None

    @precondition(lambda self: self.having(UPDATABLE))
    @rule(data=st.data(), amount=st.integers(0, AMOUNT_MAX))
    def update_amount(self, data: st.DataObject, amount: int) -> None:
        intent_id, m = self.pick(data, UPDATABLE)
        before = self.snapshot(intent_id)
        response = self.call("POST", f"/v1/payment_intents/{intent_id}", {"amount": amount})
        if amount < MINIMUM[m.currency]:
            return self.refused(before, response, 400, param="amount", code="amount_too_small")
        if m.status == "requires_action":
            return self.refused(before, response, 400, **UNEXPECTED_STATE)
        assert response.status_code == 200, response.text
        m.amount = amount
        return None

    @precondition(lambda self: self.models)
    @rule(data=st.data(), operation=st.sampled_from(sorted(ALLOWED)))
    def wrong_status(self, data: st.DataObject, operation: str) -> None:
        forbidden = set(STATUSES) - ALLOWED[operation]
        assume(self.having(forbidden))
        intent_id, m = self.pick(data, forbidden)
        before = self.snapshot(intent_id)
        path, params = {
            "confirm": (f"/v1/payment_intents/{intent_id}/confirm", {"payment_method": CARDS["success"]}),
            "capture": (f"/v1/payment_intents/{intent_id}/capture", {}),
            "cancel": (f"/v1/payment_intents/{intent_id}/cancel", {}),
            "refund": ("/v1/refunds", {"payment_intent": intent_id}),
            "update": (f"/v1/payment_intents/{intent_id}", {"amount": m.amount}),
        }[operation]
        self.refused(before, self.call("POST", path, params), 400, **UNEXPECTED_STATE)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def api_agrees_with_the_model(self) -> None:
        for intent_id, m in self.models.items():
            intent = self.intent(intent_id)
            assert (intent["status"], intent["amount"], intent["currency"]) == (m.status, m.amount, m.currency)
            assert (intent["amount_capturable"], intent["amount_received"]) == (m.capturable, m.received)
            assert (intent["next_action"] is not None) == (m.status == "requires_action")
            charges = self.charges(intent_id)
            assert len(charges) == m.charges
            assert sum(c["amount_captured"] for c in charges) == m.received
            assert sum(c["amount_refunded"] for c in charges if c["captured"]) == m.refunded <= m.received

    @invariant()
    def processor_agrees_with_the_model(self) -> None:
        sandbox, models = self.driver.services.sandbox, self.models.values()
        assert self.driver.run(sandbox.count_authorizations(self.merchant_id)) == sum(m.authorizations for m in models)
        captured: dict[str, int] = {}
        for m in models:
            if m.authorizations:
                captured[m.currency] = captured.get(m.currency, 0) + m.received
        assert self.driver.run(sandbox.captured_minor_by_currency(self.merchant_id)) == captured
        charges = self.driver.run(sandbox.list_charges(self.merchant_id))
        assert sum(c.refunded_minor for c in charges) == sum(m.refunded for m in models)


def test_intent_operations_follow_stripes_state_machine(driver: Driver) -> None:
    run_state_machine_as_test(
        lambda: IntentMachine(driver),
        settings=hypothesis_settings(
            max_examples=40,
            stateful_step_count=12,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
