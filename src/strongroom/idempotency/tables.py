import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

# One row per (merchant, mode, key): draft §2 — keys are scoped to the client that sent them. The
# key itself is never stored, only its HMAC (idempotency.service.scoped; migration 0011).
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("livemode", sa.Boolean, primary_key=True),
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("fingerprint", sa.LargeBinary(32), nullable=False),
    sa.Column("method", sa.String(8), nullable=False),
    sa.Column("path", sa.String(512), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    # Set while a request holds the key; cleared when its response is stored.
    sa.Column("locked_at", Timestamp),
    # Brandur's recovery point: the object the request created or acted on, recorded in the
    # same transaction as its first write, so a retry after a crash resumes that object.
    sa.Column("resource_id", sa.String(40)),
    sa.Column("response_status", sa.Integer),
    sa.Column("response_body", sa.LargeBinary),
    # A key's row is written twice: claimed (~150 bytes), then its response stored (~1 KB). With
    # full pages the second write found no room on the row's page, so PostgreSQL put the new
    # version on another page and added it to both indexes again (a random leaf of the key's
    # index: keys are the clients'). With pages filled to 15% at insert, the response fits beside
    # its row: a heap-only (HOT) update, no index entry (measured: 20% -> 100% of these updates,
    # 2 index entries and ~4 WAL records less a payment). Migration 0010.
    postgresql_with={"fillfactor": 15},
)
sa.Index("ix_idempotency_keys_created", idempotency_keys.c.created)
