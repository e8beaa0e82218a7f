"""card_tokens: single-use card tokens (POST /v1/tokens)

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "card_tokens",
        sa.Column("merchant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.Column("client_ip", sa.String(length=45), nullable=True),
        sa.Column("card_brand", sa.String(length=32), nullable=False),
        sa.Column("card_bin", sa.String(length=8), nullable=False),
        sa.Column("card_last4", sa.String(length=4), nullable=False),
        sa.Column("card_exp_month", sa.Integer(), nullable=False),
        sa.Column("card_exp_year", sa.Integer(), nullable=False),
        sa.Column("card_funding", sa.String(length=16), nullable=False),
        sa.Column("card_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("vault_token", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("merchant_id", "id", name=op.f("pk_card_tokens")),
    )


def downgrade() -> None:
    op.drop_table("card_tokens")
