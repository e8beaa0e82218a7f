"""idempotency_keys pages filled to 15% at insert, so storing a response is a HOT update (see
idempotency.tables); PostgreSQL only (SQLite has no fillfactor)

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE idempotency_keys SET (fillfactor = 15)")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("ALTER TABLE idempotency_keys RESET (fillfactor)")
