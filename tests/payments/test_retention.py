"""PCI DSS 3.2.1: card data is not kept past its need — the scheduled purge, judged by the rows
on disk before and after: an unused token older than its TTL is gone with its card, a spent
token and a payment method's card stay, a card nothing refers to goes once past its grace, and
each run deletes at most its batch."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

from strongroom.payments.card_form import card_form_sessions
from strongroom.payments.retention import Purge, Purged
from strongroom.payments.tokens import card_tokens
from strongroom.sensitive import Secret
from strongroom.settings import RetentionSettings
from strongroom.store.db import utcnow
from strongroom.vault.tables import vault_cards

CARD = {"card[number]": "4242424242424242", "card[exp_month]": "12", "card[exp_year]": "2034"}
SETTINGS = RetentionSettings(token_ttl_s=3600, orphan_card_grace_s=7200, purge_batch=50)


async def _post(api: Any, path: str, data: dict[str, str]) -> dict[str, Any]:
    response = await api.post(path, data=data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _on_disk(services: Any, merchant_id: str) -> tuple[set[str], set[str]]:
    """(token ids, vault card tokens) of the merchant in the database."""
    async with services.db.read() as conn:
        toks = await conn.execute(sa.select(card_tokens.c.id).where(card_tokens.c.merchant_id == merchant_id))
        cards = await conn.execute(sa.select(vault_cards.c.token).where(vault_cards.c.merchant_id == merchant_id))
        return {row.id for row in toks}, {row.token for row in cards}


async def _vault_token(services: Any, merchant_id: str, token_id: str) -> str:
    async with services.db.read() as conn:
        query = sa.select(card_tokens.c.vault_token).where(
            card_tokens.c.merchant_id == merchant_id, card_tokens.c.id == token_id
        )
        return str(await conn.scalar(query))


async def _orphan(services: Any, merchant_id: str) -> str:
    """A card the vault stored but nothing refers to (a request that died after storing it)."""
    async with services.db.tx() as conn:
        stored = await services.payments.vault.tokenize(conn, merchant_id, Secret("5555555555554444"), None)
    return str(stored.token)


async def _purge_all(purge: Purge, now: dt.datetime) -> list[Purged]:
    """Runs the purge until a full pass finds nothing (bounded: a test must end)."""
    runs = []
    for _ in range(1000):
        runs.append(await purge.run(now))
        if runs[-1] == Purged(0, 0, 0) and purge.scan.after is None:
            return runs
    raise AssertionError("the purge did not finish")


async def test_pci_3_2_1_unused_tokens_and_orphaned_cards_are_purged_and_used_ones_kept(api, merchant, services):
    unused = await _post(api, "/v1/tokens", CARD)
    spent = await _post(api, "/v1/tokens", CARD)
    pm_from_token = await _post(api, "/v1/payment_methods", {"type": "card", "card[token]": spent["id"]})
    pm = await _post(api, "/v1/payment_methods", {"type": "card", **CARD})
    orphan = await _orphan(services, merchant.id)
    unused_card = await _vault_token(services, merchant.id, unused["id"])
    spent_card = await _vault_token(services, merchant.id, spent["id"])
    purge = Purge(services.db, SETTINGS, vault_in_process=True)
    tokens_before, cards_before = await _on_disk(services, merchant.id)

    await _purge_all(purge, utcnow() + dt.timedelta(seconds=3000))
    within_ttl = await _on_disk(services, merchant.id)
    await _purge_all(purge, utcnow() + dt.timedelta(seconds=3700))
    past_ttl = await _on_disk(services, merchant.id)
    await _purge_all(purge, utcnow() + dt.timedelta(seconds=7300))
    past_grace = await _on_disk(services, merchant.id)

    assert tokens_before == {unused["id"], spent["id"]}
    assert len(cards_before) == 4 and {unused_card, spent_card, orphan} <= cards_before
    assert within_ttl == (tokens_before, cards_before)
    # Past the token TTL the unused token goes; its card is now an orphan, still within its grace.
    assert past_ttl == ({spent["id"]}, cards_before)
    assert past_grace == ({spent["id"]}, cards_before - {unused_card, orphan})
    for kept in (pm_from_token, pm):
        response = await api.get(f"/v1/payment_methods/{kept['id']}")
        assert response.status_code == 200
    # The kept cards still pay.
    paid = await _post(
        api,
        "/v1/payment_intents",
        {"amount": "500", "currency": "usd", "payment_method": pm_from_token["id"], "confirm": "true"},
    )
    assert paid["status"] == "succeeded"
    assert (await api.get(f"/v1/tokens/{unused['id']}")).status_code == 404


async def test_pci_3_2_1_each_run_deletes_at_most_its_batch_and_passes_over_cards_in_use(api, merchant, services):
    # Cards in use first (oldest), then orphans: a scan that restarted from the oldest each run
    # would never reach them.
    for _ in range(5):
        await _post(api, "/v1/payment_methods", {"type": "card", **CARD})
    orphans = {await _orphan(services, merchant.id) for _ in range(7)}
    purge = Purge(services.db, RetentionSettings(purge_batch=3), vault_in_process=True)

    runs = await _purge_all(purge, utcnow() + dt.timedelta(days=1))

    assert all(run.cards <= 3 and run.tokens <= 3 for run in runs)
    _, cards = await _on_disk(services, merchant.id)
    assert len(cards) == 5
    assert not cards & orphans


async def test_pci_3_2_1_a_vault_in_its_own_process_keeps_its_cards_out_of_the_apis_purge(api, merchant, services):
    orphan = await _orphan(services, merchant.id)
    purge = Purge(services.db, SETTINGS, vault_in_process=False)

    await _purge_all(purge, utcnow() + dt.timedelta(days=1))

    assert orphan in (await _on_disk(services, merchant.id))[1]


async def test_expired_card_form_sessions_are_purged(api, anonymous, merchant, services):
    session = (await api.post("/v1/elements/sessions", data={"allowed_origin": "https://shop.example"})).json()
    submitted = await anonymous.post(
        "/v1/elements/payment_methods",
        data={"client_secret": session["client_secret"], **CARD},
        headers={"Origin": "https://shop.example"},
    )
    assert submitted.status_code == 200, submitted.text
    purge = Purge(services.db, SETTINGS, vault_in_process=True)
    query = sa.select(card_form_sessions.c.id).where(card_form_sessions.c.merchant_id == merchant.id)

    await _purge_all(purge, utcnow())
    async with services.db.read() as conn:
        live = (await conn.execute(query)).scalars().all()
    await _purge_all(purge, dt.datetime.fromtimestamp(session["expires_at"] + 1, dt.UTC))
    async with services.db.read() as conn:
        expired = (await conn.execute(query)).scalars().all()

    assert live == [session["id"]]
    assert expired == []
