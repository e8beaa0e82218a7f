"""Merchant accounts and their API keys."""

import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

merchants = sa.Table(
    "merchants",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
)

# Secret keys are stored only as a keyed hash (HMAC-SHA256); the key itself is shown once.
# Looked up by hash (a reference table on Citus: it maps a key to its merchant).
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("key_hash", sa.LargeBinary(32), primary_key=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("merchant_id", sa.String(40), sa.ForeignKey("merchants.id"), nullable=False),
    sa.Column("livemode", sa.Boolean, nullable=False),
    sa.Column("hint", sa.String(16), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=True),
)
