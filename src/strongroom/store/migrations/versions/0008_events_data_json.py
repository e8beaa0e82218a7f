"""events.data as json, not jsonb, on PostgreSQL (see store.metadata.JsonDocument)

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # SQLite keeps JSON as text whatever the declared type: nothing to change there. On PostgreSQL
    # this rewrites the events table (one pass, under an exclusive lock).
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "events",
            "data",
            type_=sa.JSON(),
            existing_type=postgresql.JSONB(astext_type=sa.Text()),
            existing_nullable=False,
            postgresql_using="data::json",
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column(
            "events",
            "data",
            type_=postgresql.JSONB(astext_type=sa.Text()),
            existing_type=sa.JSON(),
            existing_nullable=False,
            postgresql_using="data::jsonb",
        )
