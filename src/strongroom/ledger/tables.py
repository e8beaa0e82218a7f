"""Ledger tables. `merchant_id` leads every key; rows are never updated or deleted (the database
refuses it: triggers in migration 0003)."""

import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

ledger_transactions = sa.Table(
    "ledger_transactions",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("livemode", sa.Boolean, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("source_type", sa.String(32), nullable=False),
    sa.Column("source_id", sa.String(40), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # The same capture or refund can never post twice: the database enforces it, not the caller.
    sa.UniqueConstraint("merchant_id", "source_type", "source_id", "kind", name="uq_ledger_transactions_source"),
)
sa.Index(
    "ix_ledger_transactions_paging",
    ledger_transactions.c.merchant_id,
    ledger_transactions.c.livemode,
    ledger_transactions.c.created,
    ledger_transactions.c.id,
)

ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("transaction_id", sa.String(40), primary_key=True),
    sa.Column("line", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("livemode", sa.Boolean, nullable=False),
    sa.Column("account", sa.String(80), nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    # Signed minor units: debit > 0, credit < 0.
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
)
sa.Index(
    "ix_ledger_entries_account",
    ledger_entries.c.merchant_id,
    ledger_entries.c.livemode,
    ledger_entries.c.account,
    ledger_entries.c.currency,
)
