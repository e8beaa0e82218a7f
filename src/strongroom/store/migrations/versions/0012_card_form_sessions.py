"""card_form_sessions: how many payment methods each hosted card-form session has created

Issue 17: a client secret was reusable; a session now creates at most
`card_form.session_max_uses` payment methods (payments.card_form). Rows are purged once their
session has expired (payments.retention).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_form_sessions",
        sa.Column("merchant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("merchant_id", "id", name=op.f("pk_card_form_sessions")),
    )
    op.create_index("ix_card_form_sessions_expires_at", "card_form_sessions", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_card_form_sessions_expires_at", table_name="card_form_sessions")
    op.drop_table("card_form_sessions")
