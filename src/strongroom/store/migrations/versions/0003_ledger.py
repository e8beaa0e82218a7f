"""ledger_transactions and ledger_entries, immutable (the database refuses UPDATE and DELETE)

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Written out in full (no SQL built from strings): the database itself refuses UPDATE and DELETE
# of journal rows (ARCHITECTURE: ledger rows are never updated or deleted; SECURITY.md I5).
_POSTGRESQL_UP = (
    "CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
    "BEGIN RAISE EXCEPTION USING MESSAGE = 'ledger rows are immutable: post a reversing transaction instead ('"
    " || TG_OP || ' on ' || TG_TABLE_NAME || ')'; END $$",
    "CREATE TRIGGER ledger_transactions_immutable BEFORE UPDATE OR DELETE ON ledger_transactions "
    "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()",
    "CREATE TRIGGER ledger_transactions_no_truncate BEFORE TRUNCATE ON ledger_transactions "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()",
    "CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries "
    "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()",
    "CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries "
    "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()",
)
_POSTGRESQL_DOWN = (
    "DROP TRIGGER IF EXISTS ledger_transactions_immutable ON ledger_transactions",
    "DROP TRIGGER IF EXISTS ledger_transactions_no_truncate ON ledger_transactions",
    "DROP TRIGGER IF EXISTS ledger_entries_immutable ON ledger_entries",
    "DROP TRIGGER IF EXISTS ledger_entries_no_truncate ON ledger_entries",
    "DROP FUNCTION IF EXISTS ledger_refuse_change()",
)
_SQLITE_UP = (
    "CREATE TRIGGER ledger_transactions_no_update BEFORE UPDATE ON ledger_transactions BEGIN "
    "SELECT RAISE(ABORT, 'ledger rows are immutable: post a reversing transaction instead "
    "(UPDATE on ledger_transactions)'); END",
    "CREATE TRIGGER ledger_transactions_no_delete BEFORE DELETE ON ledger_transactions BEGIN "
    "SELECT RAISE(ABORT, 'ledger rows are immutable: post a reversing transaction instead "
    "(DELETE on ledger_transactions)'); END",
    "CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE ON ledger_entries BEGIN "
    "SELECT RAISE(ABORT, 'ledger rows are immutable: post a reversing transaction instead "
    "(UPDATE on ledger_entries)'); END",
    "CREATE TRIGGER ledger_entries_no_delete BEFORE DELETE ON ledger_entries BEGIN "
    "SELECT RAISE(ABORT, 'ledger rows are immutable: post a reversing transaction instead "
    "(DELETE on ledger_entries)'); END",
)
_SQLITE_DOWN = (
    "DROP TRIGGER IF EXISTS ledger_transactions_no_update",
    "DROP TRIGGER IF EXISTS ledger_transactions_no_delete",
    "DROP TRIGGER IF EXISTS ledger_entries_no_update",
    "DROP TRIGGER IF EXISTS ledger_entries_no_delete",
)


def _is_postgresql() -> bool:
    return bool(op.get_bind().dialect.name == "postgresql")


def upgrade() -> None:
    op.create_table(
        "ledger_transactions",
        sa.Column("merchant_id", sa.String(length=40), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source_type", sa.String(length=32), nullable=False),
        sa.Column("source_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.PrimaryKeyConstraint("merchant_id", "id", name=op.f("pk_ledger_transactions")),
        sa.UniqueConstraint("merchant_id", "source_type", "source_id", "kind", name="uq_ledger_transactions_source"),
    )
    op.create_index(
        "ix_ledger_transactions_paging",
        "ledger_transactions",
        ["merchant_id", "livemode", "created", "id"],
        unique=False,
    )
    op.create_table(
        "ledger_entries",
        sa.Column("merchant_id", sa.String(length=40), nullable=False),
        sa.Column("transaction_id", sa.String(length=40), nullable=False),
        sa.Column("line", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("livemode", sa.Boolean(), nullable=False),
        sa.Column("account", sa.String(length=80), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("merchant_id", "transaction_id", "line", name=op.f("pk_ledger_entries")),
    )
    op.create_index(
        "ix_ledger_entries_account",
        "ledger_entries",
        ["merchant_id", "livemode", "account", "currency"],
        unique=False,
    )
    # One statement per call: asyncpg prepares each statement on its own.
    for statement in _POSTGRESQL_UP if _is_postgresql() else _SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in _POSTGRESQL_DOWN if _is_postgresql() else _SQLITE_DOWN:
        op.execute(statement)
    op.drop_index("ix_ledger_entries_account", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index("ix_ledger_transactions_paging", table_name="ledger_transactions")
    op.drop_table("ledger_transactions")
