"""vault_keks, vault_keys (envelope encryption); vault_cards reference their DEK

Cards stored before this revision were encrypted directly under one key derived (HKDF) from the
development key file. They are kept readable: they are attached to a placeholder DEK of KEK
version 0, which only the development keystore can open (it derives the same key), and the next
`strongroom keys rotate` re-encrypts them under envelope DEKs and destroys the placeholder.

Revision ID: 0005
Revises: 0004
"""

import datetime as dt

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LEGACY_DEK = "dek_legacy_hkdf_v1"


def upgrade() -> None:
    vault_keks = op.create_table(
        "vault_keks",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("keystore", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotate_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_vault_keks")),
    )
    vault_keys = op.create_table(
        "vault_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retired", sa.DateTime(timezone=True), nullable=True),
        sa.Column("encryptions_reserved", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vault_keys")),
    )
    bind = op.get_bind()
    if bind.execute(sa.text("SELECT count(*) FROM vault_cards")).scalar_one():
        now = dt.datetime.now(dt.UTC)
        legacy = {"keystore": "development", "state": "retired", "created": now, "rotate_after": now, "retired": now}
        op.bulk_insert(vault_keks, [{"version": 0, **legacy}])
        op.bulk_insert(
            vault_keys,
            [
                {
                    "id": LEGACY_DEK,
                    "kek_version": 0,
                    "wrapped_key": b"",
                    "state": "retired",
                    "created": now,
                    "retired": now,
                    "encryptions_reserved": 0,
                }
            ],
        )
    with op.batch_alter_table("vault_cards", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dek_id", sa.String(length=40), nullable=True))
    op.execute(sa.text("UPDATE vault_cards SET dek_id = :dek").bindparams(dek=LEGACY_DEK))
    with op.batch_alter_table("vault_cards", schema=None) as batch_op:
        batch_op.alter_column("dek_id", existing_type=sa.String(length=40), nullable=False)
        batch_op.drop_column("key_version")
        batch_op.create_foreign_key(batch_op.f("fk_vault_cards_dek_id_vault_keys"), "vault_keys", ["dek_id"], ["id"])
        batch_op.create_index("ix_vault_cards_dek", ["dek_id"], unique=False)


def downgrade() -> None:
    # Envelope-encrypted cards cannot be expressed in the old single-key layout: downgrading
    # keeps the rows but they stay unreadable by the old code.
    with op.batch_alter_table("vault_cards", schema=None) as batch_op:
        batch_op.drop_index("ix_vault_cards_dek")
        batch_op.drop_constraint(batch_op.f("fk_vault_cards_dek_id_vault_keys"), type_="foreignkey")
        batch_op.add_column(sa.Column("key_version", sa.Integer(), nullable=False, server_default="1"))
        batch_op.drop_column("dek_id")
    op.drop_table("vault_keys")
    op.drop_table("vault_keks")
