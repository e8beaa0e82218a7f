"""Tables of the payments domain. `merchant_id` leads every key (distributable on Citus)."""

import sqlalchemy as sa

from strongroom.store.metadata import Json, Timestamp, metadata


def _owned(name: str, *columns: sa.Column[object] | sa.Index | sa.Constraint) -> sa.Table:
    """A merchant-owned table: (merchant_id, id) primary key, livemode, created, and a paging index."""
    table = sa.Table(
        name,
        metadata,
        sa.Column("merchant_id", sa.String(40), primary_key=True),
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("livemode", sa.Boolean, nullable=False),
        sa.Column("created", Timestamp, nullable=False),
        *columns,
    )
    sa.Index(f"ix_{name}_paging", table.c.merchant_id, table.c.livemode, table.c.created, table.c.id)
    return table


customers = _owned(
    "customers",
    sa.Column("email", sa.String(512)),
    sa.Column("name", sa.String(256)),
    sa.Column("description", sa.String(1000)),
    sa.Column("phone", sa.String(64)),
    sa.Column("metadata", Json, nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False, default=False),
)

payment_methods = _owned(
    "payment_methods",
    sa.Column("type", sa.String(32), nullable=False),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("card_brand", sa.String(32), nullable=False),
    sa.Column("card_bin", sa.String(8), nullable=False),
    sa.Column("card_last4", sa.String(4), nullable=False),
    sa.Column("card_exp_month", sa.Integer, nullable=False),
    sa.Column("card_exp_year", sa.Integer, nullable=False),
    sa.Column("card_funding", sa.String(16), nullable=False),
    sa.Column("card_fingerprint", sa.String(64), nullable=False),
    # The vault's token for the card: the only handle the payments domain ever holds.
    sa.Column("vault_token", sa.String(64), nullable=False),
    sa.Column("billing_details", Json, nullable=False),
    sa.Column("metadata", Json, nullable=False),
)
sa.Index("ix_payment_methods_customer", payment_methods.c.merchant_id, payment_methods.c.customer_id)

payment_intents = _owned(
    "payment_intents",
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("capture_method", sa.String(16), nullable=False),
    sa.Column("confirmation_method", sa.String(16), nullable=False),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("payment_method_id", sa.String(40)),
    sa.Column("amount_capturable", sa.BigInteger, nullable=False),
    sa.Column("amount_received", sa.BigInteger, nullable=False),
    sa.Column("description", sa.String(1000)),
    sa.Column("receipt_email", sa.String(512)),
    sa.Column("statement_descriptor", sa.String(22)),
    sa.Column("return_url", sa.String(2048)),
    sa.Column("metadata", Json, nullable=False),
    sa.Column("last_payment_error", Json),
    sa.Column("next_action", Json),
    sa.Column("cancellation_reason", sa.String(32)),
    sa.Column("canceled_at", Timestamp),
    sa.Column("latest_charge_id", sa.String(40)),
    sa.Column("client_secret", sa.String(80), nullable=False),
    sa.Column("connector", sa.String(32), nullable=False),
    # The processor-side operation in flight (authorize/capture/void): its deterministic
    # idempotency key and since when. A stale one is resumed with the same key.
    sa.Column("pending_op", sa.String(16)),
    sa.Column("pending_key", sa.String(120)),
    sa.Column("pending_amount", sa.BigInteger),
    sa.Column("pending_since", Timestamp),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("authentication_token", sa.String(64)),
    sa.Column("processor_ref", sa.String(120)),
    sa.Column("updated", Timestamp, nullable=False),
)
# Only intents with a processor call in flight (what the recovery sweep looks for): a payment's
# final update, which clears pending_since, adds no entry, and the index stays the size of the
# pending work, not of every intent ever made.
_PENDING = payment_intents.c.pending_since.is_not(None)
sa.Index(
    "ix_payment_intents_pending", payment_intents.c.pending_since, postgresql_where=_PENDING, sqlite_where=_PENDING
)

charges = _owned(
    "charges",
    sa.Column("payment_intent_id", sa.String(40), nullable=False),
    sa.Column("payment_method_id", sa.String(40), nullable=False),
    sa.Column("customer_id", sa.String(40)),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("amount_captured", sa.BigInteger, nullable=False),
    sa.Column("amount_refunded", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("captured", sa.Boolean, nullable=False),
    sa.Column("paid", sa.Boolean, nullable=False),
    sa.Column("refunded", sa.Boolean, nullable=False),
    sa.Column("failure_code", sa.String(64)),
    sa.Column("failure_message", sa.String(500)),
    sa.Column("outcome", Json),
    sa.Column("connector", sa.String(32), nullable=False),
    sa.Column("processor_ref", sa.String(120)),
)
sa.Index("ix_charges_intent", charges.c.merchant_id, charges.c.payment_intent_id)

refunds = _owned(
    "refunds",
    sa.Column("charge_id", sa.String(40), nullable=False),
    sa.Column("payment_intent_id", sa.String(40), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.String(3), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(32)),
    sa.Column("failure_reason", sa.String(64)),
    sa.Column("metadata", Json, nullable=False),
    sa.Column("processor_key", sa.String(120), nullable=False),
    sa.Column("processor_ref", sa.String(120)),
    sa.Column("pending_since", Timestamp),
)
sa.Index("ix_refunds_intent", refunds.c.merchant_id, refunds.c.payment_intent_id)
