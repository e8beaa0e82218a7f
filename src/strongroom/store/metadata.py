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
# Timestamps are UTC, `timestamptz` on PostgreSQL (ARCHITECTURE: data rules).
Timestamp = sa.DateTime(timezone=True)
