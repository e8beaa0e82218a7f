"""The relay's audit trail (PCI DSS 10.2.1 / 10.2.2): every use of card data, never the data."""

import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

vault_relay_audit = sa.Table(
    "vault_relay_audit",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("actor", sa.String(64), nullable=False),  # e.g. connector:sandbox
    sa.Column("token", sa.String(64), nullable=False),
    sa.Column("destination", sa.String(200), nullable=False),  # origin, or the refused URL
    sa.Column("method", sa.String(10), nullable=False),
    sa.Column("path", sa.String(200), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),  # sent | refused | timeout | error
    sa.Column("status_code", sa.Integer),
)
sa.Index("ix_vault_relay_audit_token", vault_relay_audit.c.merchant_id, vault_relay_audit.c.token)
