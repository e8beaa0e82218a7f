"""The worker's jobs: each runs once however many workers poll, a dead worker's lease is taken
over, failures back off and end visibly, periodic jobs run once per interval.

Workers here are separate `Database` objects (separate connection pools): on PostgreSQL they race
with real concurrent transactions. Each test uses job kinds of its own, so the shared database
may hold anything else.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
import sqlalchemy as sa

from strongroom.settings import WorkerSettings
from strongroom.store.db import Database, utcnow
from strongroom.worker import service
from strongroom.worker.runner import Periodic, Worker
from strongroom.worker.service import Job, JobState
from strongroom.worker.tables import jobs

PAN = "4000056655665556"


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
async def dbs(database_url: str) -> AsyncIterator[tuple[Database, Database]]:
    one, two = Database(database_url), Database(database_url)
    yield one, two
    await one.dispose()
    await two.dispose()


@pytest.fixture
def kind() -> str:
    return f"test_{secrets.token_hex(6)}"


async def _schedule(db: Database, kind: str, key: str, now: dt.datetime, max_attempts: int = 3) -> bool:
    async with db.tx() as conn:
        return await service.schedule(conn, kind, key=key, now=now, max_attempts=max_attempts, payload={"k": key})


async def _jobs(db: Database, kind: str) -> list[Job]:
    async with db.read() as conn:
        rows = (await conn.execute(sa.select(jobs).where(jobs.c.kind == kind).order_by(jobs.c.key))).all()
    return [Job.from_row(r) for r in rows]


def _recorder(ran: list[str], delay_s: float = 0.0) -> Callable[[Job], object]:
    async def handler(job: Job) -> None:
        ran.append(job.key)
        await asyncio.sleep(delay_s)

    return handler


async def test_two_workers_polling_together_run_each_job_exactly_once(dbs, kind):
    one, two = dbs
    clock = Clock()
    keys = [f"delivery-{i:02}" for i in range(30)]
    for key in keys:
        assert await _schedule(one, kind, key, clock.now)
    ran: list[str] = []
    settings = WorkerSettings(batch_max=4)
    workers = [
        Worker(db, settings, handlers={kind: _recorder(ran, 0.01)}, clock=clock) for db in (one, two)
    ]
    for _ in range(10):
        await asyncio.gather(*(w.run_once() for w in workers))
    assert sorted(ran) == keys
    assert {(j.state, j.runs, j.lease_owner) for j in await _jobs(one, kind)} == {(JobState.SUCCEEDED, 1, None)}


async def test_scheduling_the_same_job_twice_makes_one(dbs, kind):
    one, _ = dbs
    now = utcnow()
    assert await _schedule(one, kind, "evt_1", now)
    assert not await _schedule(one, kind, "evt_1", now)
    assert len(await _jobs(one, kind)) == 1


async def test_a_dead_workers_lease_is_taken_over_once_it_expires(dbs, kind):
    one, two = dbs
    clock = Clock()
    await _schedule(one, kind, "only", clock.now)
    # A worker leases the job and dies before finishing it.
    [leased] = await service.claim(one, owner="dead", kinds=[kind], limit=1, lease_s=60, now=clock.now)
    ran: list[str] = []
    survivor = Worker(two, WorkerSettings(lease_s=60), handlers={kind: _recorder(ran)}, clock=clock)
    clock.advance(59)
    assert await survivor.run_once() == 0
    clock.advance(2)
    assert await survivor.run_once() == 1
    assert ran == ["only"]
    # The dead worker's late report changes nothing: the lease is no longer its own.
    async with one.tx() as conn:
        assert not await service.succeed(conn, leased, owner="dead", now=clock.now)
        assert await service.fail(conn, leased, owner="dead", now=clock.now, error="x", policy=WorkerSettings()) is None
    [job] = await _jobs(one, kind)
    assert (job.state, job.runs, job.attempts) == (JobState.SUCCEEDED, 1, 0)


async def test_a_failing_job_backs_off_then_ends_failed_with_its_error_masked(dbs, kind):
    one, _ = dbs
    clock = Clock()
    await _schedule(one, kind, "doomed", clock.now, max_attempts=3)

    async def broken(job: Job) -> None:
        raise ConnectionError(f"receiver echoed card {PAN}")

    policy = WorkerSettings(retry_base_s=10, retry_max_s=1000)
    worker = Worker(one, policy, handlers={kind: broken}, clock=clock)
    assert await worker.run_once() == 1
    [job] = await _jobs(one, kind)
    delay_s = (job.run_at - clock.now).total_seconds()
    assert job.state is JobState.SCHEDULED and job.attempts == 1
    assert 5 <= delay_s <= 10  # base * 2^0, jittered down to half at most
    assert job.last_error is not None and job.last_error.startswith("ConnectionError: receiver echoed card")
    assert PAN not in job.last_error
    assert await worker.run_once() == 0  # not due yet

    clock.advance(10)
    assert await worker.run_once() == 1
    [job] = await _jobs(one, kind)
    assert 10 <= (job.run_at - clock.now).total_seconds() <= 20  # base * 2^1
    clock.advance(20)
    assert await worker.run_once() == 1
    [job] = await _jobs(one, kind)
    assert (job.state, job.attempts) == (JobState.FAILED, 3)
    clock.advance(10_000)
    assert await worker.run_once() == 0  # given up: an operator's to look at


async def test_a_periodic_job_runs_once_per_interval_however_many_workers(dbs, kind):
    clock = Clock()
    runs: list[int] = []

    async def tick() -> None:
        runs.append(1)

    workers = [
        Worker(db, WorkerSettings(), periodic=[Periodic(kind, 10.0, tick)], clock=clock) for db in dbs
    ]
    for w in workers:
        await w.register()
    await asyncio.gather(*(w.run_once() for w in workers))
    assert runs == []  # first due one interval after start
    clock.advance(10)
    await asyncio.gather(*(w.run_once() for w in workers))
    assert len(runs) == 1
    clock.advance(5)
    await asyncio.gather(*(w.run_once() for w in workers))
    assert len(runs) == 1
    clock.advance(5)
    await asyncio.gather(*(w.run_once() for w in workers))
    assert len(runs) == 2
    [job] = await _jobs(dbs[0], kind)
    assert (job.state, job.runs, job.interval_s) == (JobState.SCHEDULED, 2, 10.0)


async def test_a_failing_periodic_job_is_retried_within_its_interval_and_never_given_up(dbs, kind):
    one, _ = dbs
    clock = Clock()

    async def broken() -> None:
        raise RuntimeError("sweep failed")

    worker = Worker(one, WorkerSettings(retry_base_s=100, max_attempts=1), periodic=[Periodic(kind, 30.0, broken)],
                    clock=clock)
    await worker.register()
    for _ in range(3):
        clock.advance(30)
        assert await worker.run_once() == 1
    [job] = await _jobs(one, kind)
    assert (job.state, job.attempts) == (JobState.SCHEDULED, 3)
    assert (job.run_at - clock.now).total_seconds() <= 30


async def test_a_run_is_cut_off_at_its_lease(dbs, kind):
    one, _ = dbs
    await _schedule(one, kind, "slow", utcnow())

    async def hangs(job: Job) -> None:
        await asyncio.sleep(30)

    worker = Worker(one, WorkerSettings(lease_s=0.2), handlers={kind: hangs})
    assert await worker.run_once() == 1
    [job] = await _jobs(one, kind)
    assert (job.state, job.attempts, job.last_error) == (JobState.SCHEDULED, 1, "TimeoutError: ")


async def test_a_started_worker_runs_due_jobs_and_stop_ends_its_task(dbs, kind):
    one, _ = dbs
    ran: list[str] = []
    worker = Worker(one, WorkerSettings(poll_interval_s=0.05), handlers={kind: _recorder(ran)})
    worker.start()
    await _schedule(one, kind, "soon", utcnow())
    for _ in range(100):
        if ran:
            break
        await asyncio.sleep(0.05)
    await worker.stop()
    assert ran == ["soon"]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith(f"worker {worker.owner}")]
