"""The group-committed end of a payment (authorize._finish_grouped) gives way to the one-by-one
path when the intent changed while the processor was answering: the payment still succeeds once,
its charge and journal posting are written once, and the answer shows the intent as it now is."""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from tests.factories import card_payment_method

from strongroom.auth.models import Principal
from strongroom.connectors.base import Authorization, AuthorizeRequest
from strongroom.connectors.routing import Router
from strongroom.idempotency.service import NULL_RECORDER
from strongroom.ledger.tables import ledger_transactions
from strongroom.payments import intents
from strongroom.payments import params as p
from strongroom.payments.tables import charges, payment_intents

VISA = "4242424242424242"


class _AnnotatesWhileAuthorizing:
    """The sandbox connector, except that the merchant annotates the intent (allowed in any
    status) while the processor is still deciding."""

    def __init__(self, real: Any, ctx: Any, principal: Principal) -> None:
        self._real, self._ctx, self._principal = real, ctx, principal
        self.name = real.name

    async def authorize(self, request: AuthorizeRequest) -> Authorization:
        intent_id = request.idempotency_key.split(":")[0]
        update = p.IntentUpdate.model_validate({"metadata": {"note": "mid-flight"}})
        await intents.update(self._ctx, self._principal, intent_id, update, NULL_RECORDER)
        answer: Authorization = await self._real.authorize(request)
        return answer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_an_intent_changed_during_authorization_is_finished_one_by_one_and_charged_once(api, merchant, services):
    pm = await card_payment_method(api, VISA)
    principal = Principal(merchant_id=merchant.id, livemode=False, key_id="test")
    ctx = services.payments
    real = ctx.router.for_mode(False)
    # The annotation goes through the untouched context; the payment through the annotating one.
    changing = dataclasses.replace(ctx, router=Router(sandbox=_AnnotatesWhileAuthorizing(real, ctx, principal)))
    created = p.IntentCreate.model_validate(
        {"amount": "1500", "currency": "usd", "payment_method": pm["id"], "confirm": "true"}
    )

    finished = await intents.create(changing, principal, created, NULL_RECORDER)

    assert finished.error is None
    assert finished.intent["status"] == "succeeded"
    # The answer is the intent as stored, annotation included (not the copy taken at begin).
    assert finished.intent["metadata"] == {"note": "mid-flight"}
    intent_id = finished.intent["id"]
    async with services.db.read() as conn:
        stored = (
            (await conn.execute(sa.select(payment_intents).where(payment_intents.c.id == intent_id))).mappings().one()
        )
        charged = (
            await conn.execute(sa.select(charges.c.amount_captured).where(charges.c.payment_intent_id == intent_id))
        ).all()
        posted = await conn.scalar(
            sa.select(sa.func.count()).where(
                ledger_transactions.c.merchant_id == merchant.id,
                ledger_transactions.c.source_id == stored["latest_charge_id"],
            )
        )
    assert (stored["status"], stored["amount_received"], stored["metadata"]) == (
        "succeeded",
        1500,
        {"note": "mid-flight"},
    )
    assert stored["pending_key"] is None
    assert [row.amount_captured for row in charged] == [1500]
    assert posted == 1
