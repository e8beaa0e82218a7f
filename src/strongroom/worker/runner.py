"""The worker loop: lease due jobs, run each under its lease, record the outcome.

`strongroom worker` runs one in its own process; on the embedded default `strongroom serve` runs
one in-process so that the two-command start needs nothing else. Either way the worker is an
object with an owner: `start()` makes its one task and `stop()` cancels and awaits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from strongroom import ids, redact
from strongroom.settings import WorkerSettings
from strongroom.store.db import Database, utcnow
from strongroom.worker import service
from strongroom.worker.service import Job, JobState

log = structlog.get_logger(__name__)

Handler = Callable[[Job], Awaitable[object]]


@dataclass(frozen=True)
class Periodic:
    """A job that runs every `interval_s` on one worker of all those running."""

    kind: str
    interval_s: float
    run: Callable[[], Awaitable[object]]


def _ignoring_job(run: Callable[[], Awaitable[object]]) -> Handler:
    async def handler(_job: Job) -> object:
        return await run()

    return handler


def _describe(exc: BaseException) -> str:
    # Stored and shown to operators: the type and a masked message (a PAN in it is never kept).
    return redact.redact(f"{type(exc).__name__}: {exc}")


class Worker:
    def __init__(
        self,
        db: Database,
        settings: WorkerSettings,
        *,
        handlers: Mapping[str, Handler] | None = None,
        periodic: Sequence[Periodic] = (),
        owner: str | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self._db = db
        self._settings = settings
        self._periodic = list(periodic)
        self._handlers: dict[str, Handler] = dict(handlers or {})
        for job in self._periodic:
            self._handlers[job.kind] = _ignoring_job(job.run)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{ids.random_part(8)}"
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def register(self) -> None:
        """The rows of this worker's periodic jobs (idempotent: every worker does it at start)."""
        async with self._db.tx() as conn:
            for job in self._periodic:
                await service.ensure_periodic(conn, job.kind, interval_s=job.interval_s, now=self._clock())

    async def run_once(self) -> int:
        """Lease one batch of due jobs and run them one after another; the number run."""
        settings = self._settings
        batch = await service.claim(
            self._db, owner=self.owner, kinds=sorted(self._handlers), limit=settings.batch_max,
            lease_s=settings.lease_s, now=self._clock(),
        )
        for job in batch:
            await self._run(job)
        return len(batch)

    async def _run(self, job: Job) -> None:
        try:
            # Cut off at the lease: past it another worker may already have taken the job.
            async with asyncio.timeout(self._settings.lease_s):
                await self._handlers[job.kind](job)
        except Exception as exc:  # a job's failure is recorded and retried, never fatal to the loop
            await self._failed(job, _describe(exc))
            return
        async with self._db.tx() as conn:
            held = await service.succeed(conn, job, owner=self.owner, now=self._clock())
        if not held:
            log.warning("worker.lease_lost", kind=job.kind, job=job.id)

    async def _failed(self, job: Job, error: str) -> None:
        async with self._db.tx() as conn:
            state = await service.fail(
                conn, job, owner=self.owner, now=self._clock(), error=error, policy=self._settings
            )
        if state is JobState.FAILED:
            log.error("worker.job_given_up", kind=job.kind, job=job.id, attempts=job.attempts + 1, error=error)
        else:
            log.error("worker.job_failed", kind=job.kind, job=job.id, attempts=job.attempts + 1, error=error)

    async def run_forever(self) -> None:
        await self.register()
        while True:
            try:
                ran = await self.run_once()
            except Exception as exc:  # the database away for a while: keep polling, and say so
                log.error("worker.poll_failed", error=_describe(exc))
                ran = 0
            if ran < self._settings.batch_max:
                await asyncio.sleep(self._settings.poll_interval_s)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run_forever(), name=f"worker {self.owner}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
