"""reconciliation_runs and reconciliation_items

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reconciliation_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("connector", sa.String(length=32), nullable=False),
        sa.Column("report_format", sa.String(length=16), nullable=False),
        sa.Column("report_sha256", sa.String(length=64), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lines", sa.Integer(), nullable=False),
        sa.Column("matched", sa.Integer(), nullable=False),
        sa.Column("missing_in_ledger", sa.Integer(), nullable=False),
        sa.Column("missing_at_processor", sa.Integer(), nullable=False),
        sa.Column("mismatched", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reconciliation_runs")),
    )
    op.create_table(
        "reconciliation_items",
        sa.Column("run_id", sa.String(length=40), nullable=False),
        sa.Column("item", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("report_line", sa.Integer(), nullable=True),
        sa.Column("processor_txn", sa.String(length=120), nullable=True),
        sa.Column("category", sa.String(length=24), nullable=False),
        sa.Column("source_ref", sa.String(length=120), nullable=True),
        sa.Column("merchant_id", sa.String(length=40), nullable=True),
        sa.Column("ledger_transaction_id", sa.String(length=40), nullable=True),
        sa.Column("ledger_amount", sa.BigInteger(), nullable=True),
        sa.Column("ledger_currency", sa.String(length=3), nullable=True),
        sa.Column("report_amount", sa.BigInteger(), nullable=True),
        sa.Column("report_fee", sa.BigInteger(), nullable=True),
        sa.Column("report_currency", sa.String(length=3), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "item", name=op.f("pk_reconciliation_items")),
    )


def downgrade() -> None:
    op.drop_table("reconciliation_items")
    op.drop_table("reconciliation_runs")
