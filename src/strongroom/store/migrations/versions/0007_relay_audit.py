"""vault_relay_audit: every relay of card data to a processor

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_relay_audit",
        sa.Column("merchant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("destination", sa.String(length=200), nullable=False),
        sa.Column("method", sa.String(length=10), nullable=False),
        sa.Column("path", sa.String(length=200), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("merchant_id", "id", name=op.f("pk_vault_relay_audit")),
    )
    op.create_index("ix_vault_relay_audit_token", "vault_relay_audit", ["merchant_id", "token"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_vault_relay_audit_token", table_name="vault_relay_audit")
    op.drop_table("vault_relay_audit")
