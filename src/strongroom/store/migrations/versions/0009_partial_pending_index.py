"""ix_payment_intents_pending holds only pending intents (see payments.tables)

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_PENDING = sa.text("pending_since IS NOT NULL")


def upgrade() -> None:
    op.drop_index("ix_payment_intents_pending", table_name="payment_intents")
    op.create_index(
        "ix_payment_intents_pending",
        "payment_intents",
        ["pending_since"],
        unique=False,
        postgresql_where=_PENDING,
        sqlite_where=_PENDING,
    )


def downgrade() -> None:
    op.drop_index("ix_payment_intents_pending", table_name="payment_intents")
    op.create_index("ix_payment_intents_pending", "payment_intents", ["pending_since"], unique=False)
