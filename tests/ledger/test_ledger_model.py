"""Property: over random sequences of payments, partial captures and refunds in zero-, two- and
three-decimal currencies, the merchant's balance (pending + available) equals captured - refunded per currency,
and the trial balance holds after every sequence."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strongroom.ledger import service as ledger
from tests.conftest import new_merchant

CURRENCIES = ("usd", "jpy", "kwd")
# (operation, currency index, amount, which intent) — amounts are clamped to what is allowed.
STEP = st.tuples(
    st.sampled_from(["pay", "authorize", "capture", "refund"]),
    st.integers(0, len(CURRENCIES) - 1),
    st.integers(100, 50_000),
    st.integers(0, 10),
)


async def _post(api: httpx.AsyncClient, path: str, **data: Any) -> dict[str, Any]:
    response = await api.post(path, data={k: str(v) for k, v in data.items()})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=12))
async def test_merchant_balance_equals_captured_minus_refunded(app, services, steps):
    merchant = await new_merchant(services, "Model")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    expected: dict[str, int] = defaultdict(int)
    captured: list[dict[str, Any]] = []  # {"id", "currency", "refundable"}
    capturable: list[dict[str, Any]] = []  # {"id", "currency", "amount"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as api:
        for op, c, amount, which in steps:
            currency = CURRENCIES[c]
            if op in ("pay", "authorize"):
                extra = {"capture_method": "manual"} if op == "authorize" else {}
                intent = await _post(
                    api,
                    "/v1/payment_intents",
                    amount=amount,
                    currency=currency,
                    payment_method="pm_card_visa",
                    confirm="true",
                    **extra,
                )
                if op == "pay":
                    captured.append({"id": intent["id"], "currency": currency, "refundable": amount})
                    expected[currency] += amount
                else:
                    capturable.append({"id": intent["id"], "currency": currency, "amount": amount})
            elif op == "capture" and capturable:
                target = capturable.pop(which % len(capturable))
                part = 1 + amount % target["amount"]
                await _post(api, f"/v1/payment_intents/{target['id']}/capture", amount_to_capture=part)
                captured.append({"id": target["id"], "currency": target["currency"], "refundable": part})
                expected[target["currency"]] += part
            elif op == "refund" and any(t["refundable"] for t in captured):
                open_ = [t for t in captured if t["refundable"]]
                target = open_[which % len(open_)]
                part = 1 + amount % target["refundable"]
                await _post(api, "/v1/refunds", payment_intent=target["id"], amount=part)
                target["refundable"] -= part
                expected[target["currency"]] -= part
        balance = (await api.get("/v1/balance")).json()
    pending = {b["currency"]: b["amount"] for b in balance["pending"]}
    available = {b["currency"]: b["amount"] for b in balance["available"]}
    assert {c: pending[c] + available[c] for c in pending} == dict(expected)
    async with services.db.read() as conn:
        report = await ledger.check(conn, merchant_id=merchant.id)
    assert report.ok, report.problems
