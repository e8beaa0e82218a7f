"""Issue 5, "Proof in the test suite": random sequences of create / confirm (automatic and manual
capture, a succeeding or a declined card) / capture (all, part, or more than capturable) / refund
(all, part, or more than is left) / cancel, and each of them in a status that forbids it, across
several intents in usd (2 decimals), jpy (0) and kwd (3), checked after every step against a
model of what each intent holds:

- the trial balance (`ledger.check`) holds, and every journal transaction sums to zero;
- per currency, `GET /v1/balance` pending + available equals the model's captured - refunded;
- the ledger holds exactly one capture posting per captured charge and one refund posting per
  succeeded refund, each for its amount (a refused or money-less operation posts nothing).

test_ledger_model.py checks the end state of straight-line sequences; this machine checks every
intermediate state and adds cancel, declines and refused operations. It drives the app the way
tests/payments/test_intent_state_machine.py does (its `Driver`: a second app instance on an event
loop of its own), on SQLite and, with STRONGROOM_TEST_DATABASE_URL, on PostgreSQL.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, assume
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from strongroom.ledger import service as ledger
from strongroom.ledger.tables import ledger_entries
from strongroom.settings import Settings
from tests.conftest import new_merchant
from tests.ledger.test_concurrency import postings
from tests.payments.test_intent_state_machine import Driver

CURRENCIES = {"usd": 50, "jpy": 50, "kwd": 1}  # currency: minimum amount
AMOUNT_MAX = 9000
INTENTS_MAX = 5  # at once; a canceled or fully refunded intent makes room for a new one
CARDS = {"visa": "pm_card_visa", "declined": "pm_card_chargeDeclined"}
CONFIRMABLE = {"requires_payment_method", "requires_confirmation"}
CANCELABLE = {*CONFIRMABLE, "requires_capture"}
ALLOWED = {"confirm": CONFIRMABLE, "capture": {"requires_capture"}, "cancel": CANCELABLE, "refund": {"succeeded"}}
# A capture or refund amount: the default (all of it), or any amount (often more than allowed).
portions = st.one_of(st.none(), st.integers(1, AMOUNT_MAX))


@pytest.fixture(scope="module")
def driver(settings: Settings) -> Iterator[Driver]:
    running = Driver(settings)
    yield running
    running.close()


@dataclass
class Held:
    """What one intent holds, as the merchant's requests say it should."""

    currency: str
    amount: int
    manual: bool
    status: str
    charge: str | None = None  # the captured charge
    capturable: int = 0
    captured: int = 0
    refunds: dict[str, int] = field(default_factory=dict)  # succeeded refunds: id → amount

    @property
    def refundable(self) -> int:
        return self.captured - sum(self.refunds.values())

    @property
    def finished(self) -> bool:
        """Nothing can move money on it any more (it still takes refused operations)."""
        return self.status == "canceled" or (self.status == "succeeded" and self.refundable == 0)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self, driver: Driver) -> None:
        super().__init__()
        self.driver = driver
        self.held: dict[str, Held] = {}
        merchant = driver.run(new_merchant(driver.services, "Ledger state machine"))
        self.merchant_id = merchant.id
        self.api = driver.client(merchant.secret_key)

    def teardown(self) -> None:
        self.driver.run(self.api.aclose())

    # --- plumbing ---------------------------------------------------------------------------

    def post(self, path: str, data: dict[str, Any]) -> httpx.Response:
        form = {k: str(v) for k, v in data.items() if v is not None}
        return self.driver.run(self.api.post(path, data=form))

    def pick(self, data: st.DataObject, ok: Any) -> tuple[str, Held]:
        intent_id = data.draw(st.sampled_from([i for i, h in self.held.items() if ok(h)]), label="intent")
        return intent_id, self.held[intent_id]

    def having(self, statuses: set[str]) -> bool:
        return any(h.status in statuses for h in self.held.values())

    def authorized(self, h: Held, response: httpx.Response, card: str) -> None:
        """The outcome of confirming with `card`: a decline moves nothing; a success captures all
        of it at once (automatic) or holds it for a capture (manual)."""
        if card == "declined":
            assert response.status_code == 402, response.text
            h.status = "requires_payment_method"
            return
        assert response.status_code == 200, response.text
        if h.manual:
            h.status, h.capturable = "requires_capture", h.amount
        else:
            h.status, h.captured, h.charge = "succeeded", h.amount, response.json()["latest_charge"]

    def refused(self, response: httpx.Response, **error: str) -> None:
        assert response.status_code == 400, response.text
        body = response.json()["error"]
        assert {k: body.get(k) for k in error} == error, body

    # --- rules ------------------------------------------------------------------------------

    @precondition(lambda self: sum(not h.finished for h in self.held.values()) < INTENTS_MAX)
    @rule(
        money=st.sampled_from(sorted(CURRENCIES)).flatmap(
            lambda c: st.tuples(st.just(c), st.integers(CURRENCIES[c], AMOUNT_MAX))
        ),
        manual=st.booleans(),
        card=st.sampled_from([None, *CARDS]),
        confirm=st.booleans(),
    )
    def create(self, money: tuple[str, int], manual: bool, card: str | None, confirm: bool) -> None:
        currency, amount = money
        params: dict[str, Any] = {"amount": amount, "currency": currency}
        params["capture_method"] = "manual" if manual else "automatic"
        if card is not None:
            params["payment_method"] = CARDS[card]
        h = Held(currency, amount, manual, "requires_payment_method" if card is None else "requires_confirmation")
        if card is not None and confirm:
            response = self.post("/v1/payment_intents", {**params, "confirm": "true"})
            body = response.json()
            intent_id = body["error"]["payment_intent"]["id"] if response.status_code == 402 else body["id"]
            self.authorized(h, response, card)
        else:
            response = self.post("/v1/payment_intents", params)
            assert response.status_code == 200, response.text
            intent_id = response.json()["id"]
        self.held[intent_id] = h

    @precondition(lambda self: self.having(CONFIRMABLE))
    @rule(data=st.data(), card=st.sampled_from(sorted(CARDS)))
    def confirm(self, data: st.DataObject, card: str) -> None:
        intent_id, h = self.pick(data, lambda h: h.status in CONFIRMABLE)
        response = self.post(f"/v1/payment_intents/{intent_id}/confirm", {"payment_method": CARDS[card]})
        self.authorized(h, response, card)

    @precondition(lambda self: self.having({"requires_capture"}))
    @rule(data=st.data(), amount=portions)
    def capture(self, data: st.DataObject, amount: int | None) -> None:
        intent_id, h = self.pick(data, lambda h: h.status == "requires_capture")
        response = self.post(f"/v1/payment_intents/{intent_id}/capture", {"amount_to_capture": amount})
        if amount is not None and amount > h.capturable:
            return self.refused(response, param="amount_to_capture", code="amount_too_large")
        assert response.status_code == 200, response.text
        h.status, h.captured, h.capturable = "succeeded", h.capturable if amount is None else amount, 0
        h.charge = response.json()["latest_charge"]
        return None

    @precondition(lambda self: self.having({"succeeded"}))
    @rule(data=st.data(), amount=portions)
    def refund(self, data: st.DataObject, amount: int | None) -> None:
        intent_id, h = self.pick(data, lambda h: h.status == "succeeded")
        response = self.post("/v1/refunds", {"payment_intent": intent_id, "amount": amount})
        if h.refundable == 0:
            return self.refused(response, code="charge_already_refunded")
        if amount is not None and amount > h.refundable:
            return self.refused(response, param="amount", code="amount_too_large")
        assert response.status_code == 200, response.text
        refund = response.json()
        assert (refund["status"], refund["amount"]) == ("succeeded", amount or h.refundable)
        h.refunds[refund["id"]] = refund["amount"]
        return None

    @precondition(lambda self: self.having(CANCELABLE))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        intent_id, h = self.pick(data, lambda h: h.status in CANCELABLE)
        response = self.post(f"/v1/payment_intents/{intent_id}/cancel", {})
        assert response.status_code == 200, response.text
        h.status, h.capturable = "canceled", 0

    @precondition(lambda self: self.held)
    @rule(data=st.data(), operation=st.sampled_from(sorted(ALLOWED)))
    def in_a_status_that_forbids_it(self, data: st.DataObject, operation: str) -> None:
        """Refused with 400 (and, the invariants check, without a posting)."""
        forbidden = [i for i, h in self.held.items() if h.status not in ALLOWED[operation]]
        assume(forbidden)
        intent_id = data.draw(st.sampled_from(forbidden), label="intent")
        path, params = {
            "confirm": (f"/v1/payment_intents/{intent_id}/confirm", {"payment_method": CARDS["visa"]}),
            "capture": (f"/v1/payment_intents/{intent_id}/capture", {}),
            "cancel": (f"/v1/payment_intents/{intent_id}/cancel", {}),
            "refund": ("/v1/refunds", {"payment_intent": intent_id}),
        }[operation]
        self.refused(self.post(path, params), code="payment_intent_unexpected_state")

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def trial_balance_holds_and_every_transaction_sums_to_zero(self) -> None:
        async def read() -> tuple[ledger.CheckReport, list[Any]]:
            e = ledger_entries.c
            async with self.driver.services.db.read() as conn:
                report = await ledger.check(conn, merchant_id=self.merchant_id)
                sums = await conn.execute(
                    sa.select(e.transaction_id, e.currency, sa.func.sum(e.amount_minor))
                    .where(e.merchant_id == self.merchant_id)
                    .group_by(e.transaction_id, e.currency)
                )
                return report, list(sums)

        report, sums = self.driver.run(read())
        assert report.ok, report.problems
        assert [(txn, currency, total) for txn, currency, total in sums if total != 0] == []
        assert len(sums) == report.transactions  # one currency per transaction

    @invariant()
    def balance_equals_captured_minus_refunded(self) -> None:
        expected: dict[str, int] = defaultdict(int)
        for h in self.held.values():
            expected[h.currency] += h.refundable
        balance = self.driver.run(self.api.get("/v1/balance")).json()
        owed: dict[str, int] = defaultdict(int)
        for b in [*balance["pending"], *balance["available"]]:
            owed[b["currency"]] += b["amount"]
        for currency in CURRENCIES:
            assert owed.get(currency, 0) == expected.get(currency, 0), (currency, balance, dict(expected))

    @invariant()
    def one_posting_per_capture_and_per_refund(self) -> None:
        services = self.driver.services
        captures = self.driver.run(postings(services, self.merchant_id, "capture"))
        assert captures == {h.charge: [h.captured] for h in self.held.values() if h.charge is not None}
        refunds = self.driver.run(postings(services, self.merchant_id, "refund"))
        assert refunds == {r: [amount] for h in self.held.values() for r, amount in h.refunds.items()}


def test_ledger_follows_random_payments_refunds_and_cancels(driver: Driver) -> None:
    run_state_machine_as_test(
        lambda: LedgerMachine(driver),
        settings=hypothesis_settings(
            max_examples=20,
            stateful_step_count=16,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
