"""Pool exhaustion mid-request never claims "not processed" for work that was done.

With one pooled connection and a tiny pool timeout, 40 concurrent refunds (no Idempotency-Key)
fight for the connection. A refund that ran (its row exists, the processor refunded it) must
never be answered 503 "overloaded, not processed, retry": a client believing that would refund
twice. Such a request is answered 500 `outcome_unknown` instead (the recovery sweep completes it).
PostgreSQL only (real concurrent connections), selected like the other race tests.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import httpx
import pytest
import sqlalchemy as sa
from tests.conftest import make_settings, new_merchant

from strongroom.app import create_app
from strongroom.payments import recovery
from strongroom.payments.tables import refunds

PG_PARAMS = ["postgres"] if os.environ.get("STRONGROOM_TEST_DATABASE_URL") else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)


async def test_a_refund_that_ran_is_never_answered_not_processed(database_url, data_dir):
    # The session's data dir: its development keystore opens the session database's keys.
    settings = make_settings(database_url, data_dir, database={"pool_size": 1, "pool_timeout_s": 0.05})
    app = create_app(settings, background=False)
    async with app.router.lifespan_context(app):
        services = app.state.services
        merchant = await new_merchant(services)
        headers = {"Authorization": f"Bearer {merchant.secret_key}"}
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers
        ) as api:
            paid = await api.post(
                "/v1/payment_intents",
                data={"amount": "10000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
            )
            assert paid.status_code == 200, paid.text
            answers = await asyncio.gather(
                *(
                    api.post("/v1/refunds", data={"payment_intent": paid.json()["id"], "amount": "100"})
                    for _ in range(40)
                )
            )
        statuses = Counter(a.status_code for a in answers)
        assert set(statuses) <= {200, 500, 503}, statuses
        answered_ok = {a.json()["id"] for a in answers if a.status_code == 200}
        async with services.db.read() as conn:
            query = sa.select(refunds.c.id).where(refunds.c.merchant_id == merchant.id)
            created = {row.id for row in await conn.execute(query)}
        # Every refund that exists was either answered 200 or told its outcome is unknown.
        assert len(created - answered_ok) <= statuses[500], (statuses, len(created), len(answered_ok))
        assert statuses[503] + len(created) <= 40
        for answer in answers:
            if answer.status_code == 500:
                assert answer.json()["error"]["code"] == "outcome_unknown"
        await recovery.sweep(services.payments, older_than_s=0)
        async with services.db.read() as conn:
            pending = await conn.scalar(
                sa.select(sa.func.count()).where(refunds.c.merchant_id == merchant.id, refunds.c.status == "pending")
            )
        assert pending == 0
