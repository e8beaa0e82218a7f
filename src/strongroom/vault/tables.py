import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

# The PAN is stored only as AES-256-GCM ciphertext bound (AAD) to its merchant and token.
vault_cards = sa.Table(
    "vault_cards",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("nonce", sa.LargeBinary(12), nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
)
