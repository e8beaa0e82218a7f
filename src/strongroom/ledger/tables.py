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

# Reconciliation runs against a processor's settlement report. A report covers one processor
# account shared by every merchant, so a run is not merchant data; each item names its merchant
# when the line could be matched to one.
reconciliation_runs = sa.Table(
    "reconciliation_runs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("connector", sa.String(32), nullable=False),
    sa.Column("report_format", sa.String(16), nullable=False),
    sa.Column("report_sha256", sa.String(64), nullable=False),
    sa.Column("period_start", Timestamp),
    sa.Column("period_end", Timestamp),
    sa.Column("lines", sa.Integer, nullable=False),
    sa.Column("matched", sa.Integer, nullable=False),
    sa.Column("missing_in_ledger", sa.Integer, nullable=False),
    sa.Column("missing_at_processor", sa.Integer, nullable=False),
    sa.Column("mismatched", sa.Integer, nullable=False),
)

reconciliation_items = sa.Table(
    "reconciliation_items",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("item", sa.Integer, primary_key=True, autoincrement=False),
    # matched | missing_in_ledger | missing_at_processor | amount_mismatch | currency_mismatch
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("report_line", sa.Integer),  # 1-based data line of the report; None if missing there
    sa.Column("processor_txn", sa.String(120)),
    sa.Column("category", sa.String(24), nullable=False),  # charge | refund
    sa.Column("source_ref", sa.String(120)),  # the processor's charge or refund reference
    sa.Column("merchant_id", sa.String(40)),
    sa.Column("ledger_transaction_id", sa.String(40)),
    sa.Column("ledger_amount", sa.BigInteger),
    sa.Column("ledger_currency", sa.String(3)),
    sa.Column("report_amount", sa.BigInteger),
    sa.Column("report_fee", sa.BigInteger),
    sa.Column("report_currency", sa.String(3)),
)
