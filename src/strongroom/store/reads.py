"""Group reads (PostgreSQL): concurrent lookups of one statement sent as one statement.

Every payment reads its payment method and, in the vault, its card: each a SELECT by key on its
own (`Database.fetch_one`). Each is a round trip, and on this machine the write to PostgreSQL's
socket was the largest single cost of a payment in the server (py-spy --native: a quarter of the
event loop's time, nearly all of it in `write`). Lookups of the same statement that arrive
within a few event-loop turns of each other go as one (pg.batched): N parameter sets, one
execution, one round trip. Alone, a lookup is its plain statement. A batch that fails is run
again one lookup at a time, so a bad value fails only its own request.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from strongroom.store import pg
from strongroom.store.flush import FlushScheduler

Row = dict[str, Any]


@dataclass
class _Lookup:
    params: Mapping[str, Any]
    done: asyncio.Future[Row | None]


@dataclass
class _Lane:
    """One event loop's pending lookups, by plan (futures belong to the loop that made them)."""

    pending: dict[int, tuple[pg.Plan, list[_Lookup]]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class GroupRead:
    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[Any]],
        *,
        gather_turns: int,
        scheduler: FlushScheduler | None = None,
    ) -> None:
        self._connect = connect
        self._gather_turns = max(0, gather_turns)
        # When given, it decides when each statement's lookups go (store.flush); else a task
        # per statement lets `gather_turns` turns pass first.
        self._scheduler = scheduler
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = weakref.WeakKeyDictionary()

    async def fetch_one(self, plan: pg.Plan, params: Mapping[str, Any]) -> Row | None:
        if self._gather_turns == 0 or pg.batched(plan) is None:
            return await self._alone(plan, params)
        loop = asyncio.get_running_loop()
        lane = self._lanes.setdefault(loop, _Lane())
        lookup = _Lookup(params, loop.create_future())
        queued = lane.pending.get(id(plan))
        if queued is None and self._scheduler is not None:
            waiting = [lookup]
            lane.pending[id(plan)] = (plan, waiting)
            self._scheduler.ready(
                (id(self), id(plan)),
                waiting.__len__,
                functools.partial(self._flush, lane, plan, waiting),
                functools.partial(_abandon, lane, id(plan), waiting),
            )
        elif queued is None:
            waiting = [lookup]
            lane.pending[id(plan)] = (plan, waiting)
            task = loop.create_task(self._gather(lane, plan))
            lane.tasks.add(task)
            task.add_done_callback(functools.partial(_finished, lane, id(plan), waiting))
        else:
            queued[1].append(lookup)
        # Awaited directly (see GroupCommit.commit): a request cancelled while waiting cancels
        # only its own future; the batch's task answers the others.
        return await lookup.done

    async def _gather(self, lane: _Lane, plan: pg.Plan) -> None:
        for _ in range(self._gather_turns):
            await asyncio.sleep(0)  # lookups a turn or two behind join this one
        await self._run(plan, lane.pending.pop(id(plan))[1])

    async def _flush(self, lane: _Lane, plan: pg.Plan, waiting: list[_Lookup]) -> None:
        """The statement's lookups, for the flush scheduler; later ones start a new list."""
        if lane.pending.get(id(plan), (None, None))[1] is waiting:
            del lane.pending[id(plan)]
        try:
            await self._run(plan, waiting)
        except BaseException:
            for lookup in waiting:  # cancelled (shutdown): nothing answered is left waiting
                lookup.done.cancel()
            raise

    async def _run(self, plan: pg.Plan, batch: list[_Lookup]) -> None:
        statement = pg.batched(plan)
        rows = await self._together(plan, statement, batch) if len(batch) > 1 and statement is not None else None
        if rows is not None:
            for lookup, row in zip(batch, rows, strict=True):
                _settle(lookup, row)
            return
        for lookup in batch:
            try:
                row = await self._alone(plan, lookup.params)
            except Exception as exc:
                if not lookup.done.done():
                    lookup.done.set_exception(exc)
                continue
            _settle(lookup, row)

    async def _together(
        self, plan: pg.Plan, statement: pg.BatchedSelect, batch: list[_Lookup]
    ) -> list[Row | None] | None:
        """Each lookup's row from one statement; None if it failed (then each is run alone)."""
        try:
            async with self._connect() as conn:
                records = await conn.fetch(statement.sql, *statement.args([lookup.params for lookup in batch]))
        except Exception:
            return None  # one bad value fails the shared statement: the caller runs each alone
        rows: list[Row | None] = [None] * len(batch)
        for record in records:
            ordinal = record[0] - 1
            if rows[ordinal] is None:  # the first row of each lookup, as fetchrow takes it
                rows[ordinal] = dict(zip(plan.columns, tuple(record)[1:], strict=True))
        return rows

    async def _alone(self, plan: pg.Plan, params: Mapping[str, Any]) -> Row | None:
        async with self._connect() as conn:
            record = await conn.fetchrow(plan.sql, *plan.args([params])[0])
        return None if record is None else dict(zip(plan.columns, record, strict=True))


def _finished(lane: _Lane, key: int, waiting: list[_Lookup], task: asyncio.Task[None]) -> None:
    """However its task ended (cancelled at shutdown, even before it began), no lookup it was to
    answer waits forever, and no later lookup joins a queue that no task will take."""
    lane.tasks.discard(task)
    _abandon(lane, key, waiting)


def _abandon(lane: _Lane, key: int, waiting: list[_Lookup]) -> None:
    """Nobody will run these lookups (their task or the scheduler stopped): each is cancelled
    (nothing for one already answered), and no later lookup joins their list."""
    if key in lane.pending and lane.pending[key][1] is waiting:
        del lane.pending[key]
    for lookup in waiting:
        lookup.done.cancel()


def _settle(lookup: _Lookup, row: Row | None) -> None:
    if not lookup.done.done():
        lookup.done.set_result(row)
