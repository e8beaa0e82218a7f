"""What each hosted card-form session has been used for (see `strongroom.vault.elements`).

The session itself is sealed into its client secret; only its use count is stored, so that a
session creates at most `card_form.session_max_uses` payment methods. The count is claimed in the
transaction that creates the payment method: a refused card rolls the claim back with it, and of
two concurrent submissions on PostgreSQL the second waits on the row and then finds it used up.
Rows are purged once their session has expired (`retention`).
"""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.errors import InvalidRequest
from strongroom.store.metadata import Timestamp, metadata

card_form_sessions = sa.Table(
    "card_form_sessions",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("uses", sa.Integer, nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    # The purge finds expired sessions across merchants.
    sa.Index("ix_card_form_sessions_expires_at", "expires_at"),
)


async def claim_use(
    conn: AsyncConnection, merchant_id: str, session_id: str, expires_at: dt.datetime, max_uses: int
) -> None:
    """Counts one use of the session in the caller's transaction; refuses one past `max_uses`."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    t = card_form_sessions
    statement = (
        insert(t)
        .values(merchant_id=merchant_id, id=session_id, uses=1, expires_at=expires_at)
        .on_conflict_do_update(
            index_elements=[t.c.merchant_id, t.c.id],
            set_={"uses": t.c.uses + 1},
            where=t.c.uses < max_uses,
        )
        .returning(t.c.uses)
    )
    if (await conn.execute(statement)).first() is None:
        raise InvalidRequest(
            "This card form has already been used. Reload the page to enter another card.",
            code="elements_session_used",
        )


async def purge_expired(conn: AsyncConnection, now: dt.datetime, batch: int) -> int:
    """Deletes at most `batch` rows of expired sessions; the count deleted."""
    t = card_form_sessions
    expired = sa.select(t.c.merchant_id, t.c.id).where(t.c.expires_at < now).limit(batch)
    doomed = [(row.merchant_id, row.id) for row in await conn.execute(expired)]
    if doomed:
        await conn.execute(t.delete().where(sa.tuple_(t.c.merchant_id, t.c.id).in_(doomed)))
    return len(doomed)
