import sqlalchemy as sa

from strongroom.store.metadata import Json, Timestamp, metadata

# One row per job. A periodic job (interval_s set) is one row for ever, rescheduled after each run;
# a one-off job (a webhook delivery, a reconciliation fetch) ends `succeeded` or `failed`. A job
# belongs to the system or to one merchant (merchant_id), but it is work, not merchant data: it
# is looked up by due time across merchants, so merchant_id does not lead its key.
jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("kind", sa.String(64), nullable=False),  # the handler that runs it
    # Unique per kind: scheduling the same work twice is one job (a periodic job's key is its kind).
    sa.Column("key", sa.String(200), nullable=False),
    sa.Column("merchant_id", sa.String(40)),
    sa.Column("payload", Json, nullable=False),
    sa.Column("interval_s", sa.Float),
    sa.Column("state", sa.String(16), nullable=False),  # scheduled | running | succeeded | failed
    sa.Column("run_at", Timestamp, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),  # failed runs since the last success
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("runs", sa.Integer, nullable=False),
    sa.Column("lease_owner", sa.String(80)),
    sa.Column("lease_until", Timestamp),
    sa.Column("last_started_at", Timestamp),
    sa.Column("last_finished_at", Timestamp),
    sa.Column("last_error", sa.String(500)),
    sa.Column("created", Timestamp, nullable=False),
    sa.UniqueConstraint("kind", "key", name="uq_jobs_kind_key"),
)
sa.Index("ix_jobs_due", jobs.c.state, jobs.c.run_at)
