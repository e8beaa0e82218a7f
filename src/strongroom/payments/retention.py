"""PCI DSS 3.2.1: card data is kept only while it is needed — the scheduled purge.

- A `tok_` token not spent within `retention.token_ttl_s` is deleted (a spent one stays: it is the
  record of the payment method made from it, and refers to the same card).
- A vault card nothing refers to (no payment method, no token) is deleted once it is older than
  `retention.orphan_card_grace_s`; the vault decides what to scan, this domain what refers.
- Card-form session rows are deleted once their session has expired.

Each kind is purged a bounded batch per run (`retention.purge_batch`), each in its own short
transaction, so a run never holds locks on a large set; the next run continues.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.payments import card_form
from strongroom.payments.tables import payment_methods
from strongroom.payments.tokens import card_tokens
from strongroom.settings import RetentionSettings
from strongroom.store.db import Database, utcnow
from strongroom.vault import retention as vault_retention
from strongroom.vault.retention import CardKey, OrphanScan


@dataclass(frozen=True)
class Purged:
    tokens: int
    cards: int
    sessions: int


@dataclass
class Purge:
    """The scheduled job: one per process, keeping the orphan scan's place between runs."""

    db: Database
    settings: RetentionSettings
    # False when the vault runs as its own process, with its own database: its cards are not here.
    vault_in_process: bool
    scan: OrphanScan = field(default_factory=OrphanScan)

    async def run(self, now: dt.datetime | None = None) -> Purged:
        now = now or utcnow()
        batch = self.settings.purge_batch
        async with self.db.tx() as conn:
            tokens = await purge_unused_tokens(conn, now - dt.timedelta(seconds=self.settings.token_ttl_s), batch)
        cards = 0
        if self.vault_in_process:
            grace = dt.timedelta(seconds=self.settings.orphan_card_grace_s)
            async with self.db.tx() as conn:
                cards = await vault_retention.purge_orphaned_cards(conn, referenced, self.scan, now - grace, batch)
        async with self.db.tx() as conn:
            sessions = await card_form.purge_expired(conn, now, batch)
        return Purged(tokens, cards, sessions)


async def purge_unused_tokens(conn: AsyncConnection, created_before: dt.datetime, batch: int) -> int:
    """Deletes at most `batch` unspent tokens created before `created_before`."""
    t = card_tokens.c
    stale = sa.select(t.merchant_id, t.id).where(t.used.is_(False), t.created < created_before).limit(batch)
    doomed = [(row.merchant_id, row.id) for row in await conn.execute(stale)]
    if not doomed:
        return 0
    # `used` again: a token spent since the select is the payment method's now, and stays.
    result = await conn.execute(
        card_tokens.delete().where(sa.tuple_(t.merchant_id, t.id).in_(doomed), t.used.is_(False))
    )
    return int(result.rowcount)


async def referenced(conn: AsyncConnection, keys: list[CardKey]) -> set[CardKey]:
    """Which of these vault cards a payment method or a token (spent or not) still refers to."""
    found: set[CardKey] = set()
    for table in (payment_methods, card_tokens):
        pair = sa.tuple_(table.c.merchant_id, table.c.vault_token)
        rows = await conn.execute(sa.select(table.c.merchant_id, table.c.vault_token).where(pair.in_(keys)))
        found.update((row.merchant_id, row.vault_token) for row in rows)
    return found
