"""The sandbox processor's own tables: the state of the simulated remote system.

They are keyed by the processor-side idempotency key and the processor's refs, not by
`merchant_id`: the sandbox plays one remote processor account shared by all merchants, and
`Connector.fetch_status` receives the key alone. `merchant_id` is still recorded and indexed
so that tests and benchmarks can count a merchant's charges at the processor.
"""

from __future__ import annotations

import sqlalchemy as sa

from strongroom.store.metadata import Json, Timestamp, metadata

# One row per processor call that got an answer, keyed by its idempotency key: the record a
# replay answers from. Calls the processor refused as malformed or never answered (timeouts,
# its own errors) leave no row.
sandbox_operations = sa.Table(
    "sandbox_operations",
    metadata,
    sa.Column("idempotency_key", sa.Text, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),  # authorize | capture | void | refund
    sa.Column("merchant_id", sa.Text, nullable=False),
    # sha256 of the call's parameters: the same key with other parameters is refused.
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("request", Json, nullable=False),
    # authorized | captured | requires_action | declined (authorize); succeeded (the others)
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("processor_ref", sa.Text, nullable=False, unique=True),
    sa.Column("charge_ref", sa.Text, nullable=False),  # the authorization this call is about
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("decline_code", sa.Text),
    sa.Column("error_code", sa.Text),
    sa.Column("message", sa.Text),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.CheckConstraint("kind IN ('authorize', 'capture', 'void', 'refund')", name="kind"),
    sa.Index("ix_sandbox_operations_merchant_created", "merchant_id", "created_at"),
)

# One row per successful authorization ("a charge at the processor") and its money state.
# Declined and requires_action attempts never get a row: they hold no funds.
sandbox_charges = sa.Table(
    "sandbox_charges",
    metadata,
    sa.Column("processor_ref", sa.Text, primary_key=True),
    sa.Column("merchant_id", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
    sa.Column("status", sa.Text, nullable=False),  # authorized | captured | voided
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("captured_minor", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("refunded_minor", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("currency", sa.Text, nullable=False),
    sa.Column("card_brand", sa.Text, nullable=False),
    sa.Column("card_last4", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("updated_at", Timestamp, nullable=False),
    sa.CheckConstraint("status IN ('authorized', 'captured', 'voided')", name="status"),
    # The processor's own invariants, enforced by the database as a last line of defence.
    sa.CheckConstraint("amount_minor > 0", name="amount_positive"),
    sa.CheckConstraint("captured_minor >= 0 AND captured_minor <= amount_minor", name="capture_le_amount"),
    sa.CheckConstraint("refunded_minor >= 0 AND refunded_minor <= captured_minor", name="refund_le_capture"),
    sa.Index("ix_sandbox_charges_merchant_created", "merchant_id", "created_at"),
)
