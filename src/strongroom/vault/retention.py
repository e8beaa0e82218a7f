"""PCI DSS 3.2.1: a stored card nothing refers to any more is deleted.

A card becomes an orphan when the token that named it expired unused, or when a request stored
it and then failed before a payment method referred to it (a vault in its own process stores
first, the api then records). Only the payments domain knows what refers to a card, so it is
asked (`Referenced`), a batch at a time; the vault names none of its tables.

The scan walks old cards in (created, merchant, token) order from a cursor the caller keeps, so
each run reads at most `batch` cards however many are still in use, and a full pass over the
table ends where it began. A card is looked at only once it is older than the grace period:
longer than any request can hold a card it stored but has not referred to yet.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.vault.tables import vault_cards

log = structlog.get_logger(__name__)

CardKey = tuple[str, str]  # (merchant_id, vault token)
# The subset of the given cards that something still refers to.
Referenced = Callable[[AsyncConnection, list[CardKey]], Awaitable[set[CardKey]]]


@dataclass
class OrphanScan:
    """Where the scan stopped: the last card looked at, None to start from the oldest."""

    after: tuple[dt.datetime, str, str] | None = None


async def purge_orphaned_cards(
    conn: AsyncConnection, referenced: Referenced, scan: OrphanScan, older_than: dt.datetime, batch: int
) -> int:
    """Looks at the next `batch` cards created before `older_than`; deletes those nothing refers
    to, in the caller's transaction. Returns how many were deleted."""
    c = vault_cards.c
    query = sa.select(c.created, c.merchant_id, c.token).where(c.created < older_than)
    if scan.after is not None:
        created, merchant_id, token = scan.after
        cursor = sa.tuple_(sa.literal(created, c.created.type), sa.literal(merchant_id), sa.literal(token))
        query = query.where(sa.tuple_(c.created, c.merchant_id, c.token) > cursor)
    rows = (await conn.execute(query.order_by(c.created, c.merchant_id, c.token).limit(batch))).all()
    scan.after = (rows[-1].created, rows[-1].merchant_id, rows[-1].token) if len(rows) == batch else None
    keys = [(row.merchant_id, row.token) for row in rows]
    in_use = await referenced(conn, keys) if keys else set()
    orphans = [key for key in keys if key not in in_use]
    if orphans:
        await conn.execute(vault_cards.delete().where(sa.tuple_(c.merchant_id, c.token).in_(orphans)))
        log.info("vault.orphaned_cards_purged", count=len(orphans))
    return len(orphans)
