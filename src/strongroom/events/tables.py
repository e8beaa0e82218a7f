import sqlalchemy as sa

from strongroom.store.metadata import JsonDocument, Timestamp, metadata

events = sa.Table(
    "events",
    metadata,
    sa.Column("merchant_id", sa.String(40), primary_key=True),
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("livemode", sa.Boolean, nullable=False),
    sa.Column("created", Timestamp, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("object_id", sa.String(40), nullable=False),
    sa.Column("data", JsonDocument, nullable=False),
)
sa.Index("ix_events_paging", events.c.merchant_id, events.c.livemode, events.c.created, events.c.id)
