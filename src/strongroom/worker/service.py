"""Jobs: work that must not block a request, leased so that any number of workers run each once.

A worker takes due jobs with one statement: it marks them `running` under its name with a lease
(`lease_until`), choosing rows that no other transaction holds (PostgreSQL: `FOR UPDATE SKIP
LOCKED`, so two workers never wait on, or take, the same row; SQLite: its single writer, `BEGIN
IMMEDIATE`, does the same). A worker that dies holding a lease loses it when the lease runs out,
and the job is taken again: a job runs at least once, and handlers are written to be repeatable.
A worker reports the end of a run only for a lease it still holds, so a run that outlived its
lease cannot overwrite the outcome of the run that took over.

Retries back off exponentially with jitter (`WorkerSettings.retry_*`). A one-off job that fails
`max_attempts` times ends `failed`, kept with its last error for an operator; a periodic job is
never given up: it is retried at most one interval later.
"""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom import ids
from strongroom.settings import WorkerSettings
from strongroom.store.db import Database, as_utc, insert_ignore
from strongroom.worker.tables import jobs

ERROR_CHARS_MAX = 500


class JobState(enum.StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    key: str
    merchant_id: str | None
    payload: Mapping[str, Any]
    interval_s: float | None
    state: JobState
    run_at: dt.datetime
    attempts: int
    max_attempts: int
    runs: int
    lease_owner: str | None
    lease_until: dt.datetime | None
    last_error: str | None

    @classmethod
    def from_row(cls, row: Any) -> Job:
        return cls(
            id=row.id,
            kind=row.kind,
            key=row.key,
            merchant_id=row.merchant_id,
            payload=row.payload,
            interval_s=row.interval_s,
            state=JobState(row.state),
            run_at=as_utc(row.run_at),
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            runs=row.runs,
            lease_owner=row.lease_owner,
            lease_until=None if row.lease_until is None else as_utc(row.lease_until),
            last_error=row.last_error,
        )


def _new_row(kind: str, key: str, now: dt.datetime, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": ids.new_id("job"),
        "kind": kind,
        "key": key,
        "merchant_id": None,
        "payload": {},
        "interval_s": None,
        "state": JobState.SCHEDULED.value,
        "run_at": now,
        "attempts": 0,
        "max_attempts": 1,
        "runs": 0,
        "lease_owner": None,
        "lease_until": None,
        "last_started_at": None,
        "last_finished_at": None,
        "last_error": None,
        "created": now,
    }
    row.update(values)
    return row


async def schedule(
    conn: AsyncConnection,
    kind: str,
    *,
    key: str,
    now: dt.datetime,
    max_attempts: int,
    payload: Mapping[str, Any] | None = None,
    merchant_id: str | None = None,
    run_at: dt.datetime | None = None,
) -> bool:
    """A one-off job, in the caller's transaction (so it commits with the change that needs it).
    False when a job of this kind and key exists already: scheduling is idempotent."""
    row = _new_row(
        kind, key, now, payload=dict(payload or {}), merchant_id=merchant_id,
        run_at=run_at or now, max_attempts=max_attempts,
    )
    result = await conn.execute(insert_ignore(conn.dialect.name, jobs), row)
    return bool(result.rowcount)


async def ensure_periodic(conn: AsyncConnection, kind: str, *, interval_s: float, now: dt.datetime) -> None:
    """The one row of a periodic job, first due one interval from now; a changed interval is
    taken, and brings the next run forward when it is shorter."""
    await conn.execute(
        insert_ignore(conn.dialect.name, jobs),
        _new_row(kind, kind, now, interval_s=interval_s, run_at=now + dt.timedelta(seconds=interval_s)),
    )
    sooner = now + dt.timedelta(seconds=interval_s)
    await conn.execute(
        jobs.update()
        .where(jobs.c.kind == kind, jobs.c.key == kind, jobs.c.interval_s != interval_s)
        .values(interval_s=interval_s, run_at=sa.case((jobs.c.run_at > sooner, sooner), else_=jobs.c.run_at))
    )


async def claim(
    db: Database, *, owner: str, kinds: Sequence[str], limit: int, lease_s: float, now: dt.datetime
) -> list[Job]:
    """Lease up to `limit` due jobs of these kinds (scheduled and due, or running on an expired
    lease) to `owner`, oldest due first. One statement, one transaction."""
    due = (
        sa.select(jobs.c.id)
        .where(
            jobs.c.kind.in_(kinds),
            sa.or_(
                sa.and_(jobs.c.state == JobState.SCHEDULED.value, jobs.c.run_at <= now),
                sa.and_(jobs.c.state == JobState.RUNNING.value, jobs.c.lease_until < now),
            ),
        )
        .order_by(jobs.c.run_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    statement = (
        jobs.update()
        .where(jobs.c.id.in_(due.scalar_subquery()))
        .values(
            state=JobState.RUNNING.value,
            lease_owner=owner,
            lease_until=now + dt.timedelta(seconds=lease_s),
            last_started_at=now,
        )
        .returning(*jobs.c)
    )
    async with db.tx() as conn:
        rows = (await conn.execute(statement)).all()
    return sorted((Job.from_row(r) for r in rows), key=lambda j: j.run_at)


def _held(job: Job, owner: str) -> Any:
    return sa.and_(jobs.c.id == job.id, jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING.value)


async def succeed(conn: AsyncConnection, job: Job, *, owner: str, now: dt.datetime) -> bool:
    """Record a finished run; False when the lease was lost (another worker owns the job now)."""
    values: dict[str, Any] = {
        "lease_owner": None, "lease_until": None, "last_finished_at": now, "last_error": None,
        "attempts": 0, "runs": jobs.c.runs + 1,
    }
    if job.interval_s is not None:
        values |= {"state": JobState.SCHEDULED.value, "run_at": now + dt.timedelta(seconds=job.interval_s)}
    else:
        values["state"] = JobState.SUCCEEDED.value
    result = await conn.execute(jobs.update().where(_held(job, owner)).values(**values))
    return bool(result.rowcount)


def retry_delay_s(attempts: int, policy: WorkerSettings, interval_s: float | None) -> float:
    """Exponential backoff with jitter (half to all of base * 2^(attempts-1)), capped at
    `retry_max_s`, and for a periodic job at its interval."""
    ceiling: float = min(policy.retry_max_s, policy.retry_base_s * 2.0 ** min(attempts - 1, 60))
    if interval_s is not None:
        ceiling = min(ceiling, interval_s)
    return ceiling * (0.5 + secrets.randbelow(501) / 1000)


async def fail(
    conn: AsyncConnection, job: Job, *, owner: str, now: dt.datetime, error: str, policy: WorkerSettings
) -> JobState | None:
    """Record a failed run: retried later, or `failed` for good when a one-off job has used its
    attempts. None when the lease was lost."""
    attempts = job.attempts + 1
    given_up = job.interval_s is None and attempts >= job.max_attempts
    state = JobState.FAILED if given_up else JobState.SCHEDULED
    values: dict[str, Any] = {
        "state": state.value, "attempts": attempts, "lease_owner": None, "lease_until": None,
        "last_finished_at": now, "last_error": error[:ERROR_CHARS_MAX],
    }
    if not given_up:
        values["run_at"] = now + dt.timedelta(seconds=retry_delay_s(attempts, policy, job.interval_s))
    result = await conn.execute(jobs.update().where(_held(job, owner)).values(**values))
    return state if result.rowcount else None


async def listing(conn: AsyncConnection, *, limit: int = 100) -> list[Job]:
    """Periodic jobs, then the most recent one-off jobs: what `strongroom worker status` shows."""
    rows = (
        await conn.execute(
            sa.select(jobs).order_by(jobs.c.interval_s.is_(None), jobs.c.run_at.desc()).limit(limit)
        )
    ).all()
    return [Job.from_row(r) for r in rows]
