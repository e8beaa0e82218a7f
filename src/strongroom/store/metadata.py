"""The one MetaData every domain's `tables.py` registers on, with stable constraint names."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# JSON documents: JSONB on PostgreSQL, JSON (text) on SQLite.
Json = sa.JSON().with_variant(JSONB(), "postgresql")
# Documents written once and only ever read back whole (events' snapshots): `json` on PostgreSQL,
# the text as written, which PostgreSQL only checks. As `jsonb` PostgreSQL built its binary form at
# every insert, and three snapshots (2.8 KB) are written per payment. Five interleaved pairs of
# 10 s runs (wrk, 2 workers, 32 clients): PostgreSQL's CPU per payment 0.347 -> 0.317 ms on
# average, 1945 -> 2078 payments/s (json ahead in four pairs of five). The stored text keeps the
# order of the object's fields, as the API shows them; jsonb reordered them (shorter keys first).
JsonDocument = sa.JSON()
# Timestamps are UTC, `timestamptz` on PostgreSQL (ARCHITECTURE: data rules).
Timestamp = sa.DateTime(timezone=True)
