"""The vault's tables: key-encryption-key versions, wrapped data-encryption keys, card ciphertexts.

None of them holds key material in the clear: KEKs live in the keystore (an HSM in production),
and `vault_keys` holds DEKs only wrapped by a KEK.
"""

import sqlalchemy as sa

from strongroom.store.metadata import Timestamp, metadata

# Versions of the key-encryption key. The key itself is in the keystore (label/file per version);
# this row is its lifecycle: pending (claimed by a rotation, maybe not generated yet) → active →
# retired → destroyed, and its crypto-period (NIST SP 800-57, SECURITY.md C2).
vault_keks = sa.Table(
    "vault_keks",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("keystore", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("rotate_after", Timestamp, nullable=False),
    sa.Column("retired", Timestamp, nullable=True),
    sa.Column("destroyed", Timestamp, nullable=True),
)

# Data-encryption keys, wrapped by the KEK `kek_version`. Merchant-independent on purpose: a DEK
# is a budget of AES-GCM encryptions (SECURITY.md C1) and a crypto-period, not a tenant boundary —
# merchant binding is the AAD's job — and per-merchant DEKs would multiply HSM unwraps by the number
# of merchants. `encryptions_reserved` counts encryptions handed out in blocks to processes.
vault_keys = sa.Table(
    "vault_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("kek_version", sa.Integer, nullable=False),
    sa.Column("wrapped_key", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("retired", Timestamp, nullable=True),
    sa.Column("encryptions_reserved", sa.BigInteger, nullable=False),
)

# The PAN is stored only as AES-256-GCM ciphertext under the DEK `dek_id`, bound (AAD) to its
# merchant and token.
vault_cards = sa.Table(
    "vault_cards",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("dek_id", sa.String(40), sa.ForeignKey("vault_keys.id"), nullable=False),
    sa.Column("nonce", sa.LargeBinary(12), nullable=False),
    sa.Column("ciphertext", sa.LargeBinary, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    # Key management, not merchant queries: rotation finds the cards of a retired DEK, and a DEK
    # is destroyed only once no card references it (PCI DSS 3.7.5).
    sa.Index("ix_vault_cards_dek", "dek_id"),
)
