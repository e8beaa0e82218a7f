"""idempotency_keys hold each key only as its HMAC (`key_hash`), never the key itself

PCI DSS 3.5.1: an Idempotency-Key is whatever the client chose, an order number or a card number
among them, and was stored as sent. From here the row holds HMAC-SHA256 of the merchant, mode and
key under the server's key-hash secret (idempotency.service.scoped).

Existing rows are deleted, not hashed: a migration sees only the database URL, not that secret
(a setting, or a file in the data directory). Keys live 24 hours, so this forgets at most a
day's replays: a client retrying a request begun before the upgrade with the same key runs it as
new. The downgrade deletes the rows too (a hash cannot be turned back into the key).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_PRIMARY_KEY = "pk_idempotency_keys"


def upgrade() -> None:
    op.execute("DELETE FROM idempotency_keys")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint(_PRIMARY_KEY, type_="primary")
        batch.drop_column("key")
        batch.add_column(sa.Column("key_hash", sa.LargeBinary(32), nullable=False))
        batch.create_primary_key(_PRIMARY_KEY, ["merchant_id", "livemode", "key_hash"])


def downgrade() -> None:
    op.execute("DELETE FROM idempotency_keys")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint(_PRIMARY_KEY, type_="primary")
        batch.drop_column("key_hash")
        batch.add_column(sa.Column("key", sa.String(255), nullable=False))
        batch.create_primary_key(_PRIMARY_KEY, ["merchant_id", "livemode", "key"])
