"""Group commit: the final writes of many concurrent requests in one transaction.

A payment's last step (its charge, journal entries, events, the intent's new state and the stored
idempotent response) is a fixed list of statements whose values are all known before it starts.
Run one by one, each costs a round trip and each request pays its own BEGIN and COMMIT, which
would be most of a payment's CPU. Here requests hand their `Unit` to `GroupCommit`;
while one transaction is being written the next units queue, and the next transaction takes all
of them (up to `max_batch`), running each distinct statement once with every unit's parameters
(an executemany: one multi-row INSERT, or UPDATEs pipelined in one round trip) and committing
once. Each request still answers only after its own writes are durable.

Isolation between units: a unit may carry a `Guard` (a row it must find in an expected state,
locked FOR UPDATE on PostgreSQL). A unit whose guard fails writes nothing and is told so. If the
batch's transaction fails for any reason, every unit of it is retried alone in its own
transaction, so one bad unit fails alone and the others are unaffected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.store import pg
from strongroom.store.db import Database, as_utc

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Write:
    """One statement with its parameters; built once per call site, values bound at execution."""

    statement: sa.Executable
    params: dict[str, Any]


@dataclass(frozen=True)
class Guard:
    """The unit writes only if the row `(merchant_id, livemode, id)` of `table` still holds the
    `expected` column values when it is written (the row is locked on PostgreSQL until commit)."""

    table: sa.Table
    merchant_id: str
    livemode: bool
    id: str
    expected: Mapping[str, Any]


@dataclass
class Unit:
    writes: Sequence[Write]
    guard: Guard | None = None
    done: asyncio.Future[bool] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @functools.cached_property
    def shape(self) -> tuple[tuple[int, tuple[str, ...]], ...]:
        """Its statements and their parameter names, in order: units of one shape share each
        statement's executemany (computed once a unit; a batch looks at it twice or more)."""
        return tuple((id(w.statement), tuple(w.params)) for w in self.writes)


@dataclass
class _Lane:
    """One event loop's queue and writers (futures and tasks belong to the loop that made them)."""

    queue: list[Unit] = field(default_factory=list)
    writers: set[asyncio.Task[None]] = field(default_factory=set)
    # What the flush scheduler is handed when this lane has units (made once per lane).
    hooks: tuple[Callable[[], int], Callable[[], Awaitable[None]], Callable[[], None]] | None = None


async def execute(conn: AsyncConnection, writes: Sequence[Write]) -> None:
    """The writes one after another in the caller's transaction (the one-by-one path)."""
    for write in writes:
        await conn.execute(write.statement, write.params)


class GroupCommit:
    def __init__(self, db: Database, *, max_batch: int, max_writers: int, gather_turns: int = 0) -> None:
        self._db = db
        self._max_batch = max(1, max_batch)
        self._max_writers = max(1, max_writers)
        # Event-loop turns a writer lets pass before it takes each batch (see settings).
        self._gather_turns = max(0, gather_turns)
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = weakref.WeakKeyDictionary()
        # With gathering on, the process's flush scheduler decides when this lane's batch goes
        # (store.flush: one statement at a time, the fullest lane first); else a writer per lane.
        self._scheduler = db.flushes if self._gather_turns > 0 else None

    async def commit(self, writes: Sequence[Write], guard: Guard | None = None) -> bool:
        """True once the writes are committed; False if the guard failed (nothing written).
        Raises what the unit's own transaction raised when it fails alone."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.setdefault(loop, _Lane())
        unit = Unit(writes, guard)
        lane.queue.append(unit)
        if self._scheduler is not None:
            if lane.hooks is None:
                lane.hooks = (
                    lambda: len(lane.queue),
                    functools.partial(self._flush, lane),
                    functools.partial(_cancel_queued, lane),
                )
            self._scheduler.ready(id(lane), *lane.hooks)
            return await unit.done
        if len(lane.writers) < self._max_writers:
            writer = loop.create_task(self._drain(lane))
            lane.writers.add(writer)
            writer.add_done_callback(functools.partial(_writer_done, lane))
        # Awaited directly, not through asyncio.shield (a cost on each of a payment's four waits,
        # for nothing): a request cancelled while waiting cancels only its own future. The batch
        # is the writer's task, which settles only futures not done yet, so the others' batch goes
        # on, and this unit's writes, queued already, are still committed.
        return await unit.done

    async def _drain(self, lane: _Lane) -> None:
        batch: list[Unit] = []
        try:
            while lane.queue:
                for _ in range(self._gather_turns):
                    # Requests a turn or two from their commit join this batch: fewer, larger
                    # batches (each costs a commit), for no wait beyond the loop's own turns.
                    await asyncio.sleep(0)
                batch, lane.queue = lane.queue[: self._max_batch], lane.queue[self._max_batch :]
                await self._write_batch(batch)
        except BaseException:
            # Cancelled (shutdown): no request may wait forever for a writer that is gone.
            for unit in [*batch, *lane.queue]:
                unit.done.cancel()
            lane.queue = []
            raise
        finally:
            # Leave the lane in the same step that found the queue empty (no await in between).
            # A done-callback would run only later: a unit queued in between saw this finished
            # writer still counted, started none, and waited for the next request to start one.
            task = asyncio.current_task()
            if task is not None:
                lane.writers.discard(task)

    async def _flush(self, lane: _Lane) -> None:
        """One batch of the lane, for the flush scheduler; units beyond `max_batch` wait for the
        lane's next flush."""
        batch, lane.queue = lane.queue[: self._max_batch], lane.queue[self._max_batch :]
        if not batch:
            # Taken already: units that arrived after the scheduler chose this lane but before
            # its flush began went with that flush, yet registered the lane again.
            return
        if lane.queue and self._scheduler is not None and lane.hooks is not None:  # for mypy: set by commit()
            self._scheduler.ready(id(lane), *lane.hooks)
        try:
            await self._write_batch(batch)
        except BaseException:
            for unit in batch:  # cancelled (shutdown): no request waits for a batch that is gone
                unit.done.cancel()
            raise

    async def _write_batch(self, batch: list[Unit]) -> None:
        try:
            results = await self._batch(batch)
        except Exception as exc:
            # Visible: a batch path that always fails would otherwise only be slow. The error's
            # type only (a message can quote a row's values).
            log.warning("store.group_commit_batch_failed", error=type(exc).__name__, units=len(batch))
            # Whatever failed (one unit's constraint, a lost connection), each unit is now tried
            # alone: a bad unit fails alone and the others are unaffected.
            await self._one_by_one(batch)
            return
        for unit, ok in zip(batch, results, strict=True):
            _settle(unit, ok)

    async def _batch(self, batch: list[Unit]) -> list[bool]:
        if self._db.dialect == "postgresql" and _translatable(batch, self._db.engine.dialect):
            return await _write_asyncpg(self._db, batch)
        async with self._db.tx() as conn:
            return await _write(conn, batch)

    async def _one_by_one(self, batch: list[Unit]) -> None:
        for unit in batch:
            try:
                async with self._db.tx() as conn:
                    (ok,) = await _write(conn, [unit])
            except Exception as exc:
                if not unit.done.done():
                    unit.done.set_exception(exc)  # raised to the request that owns the unit
                continue
            _settle(unit, ok)


def _writer_done(lane: _Lane, writer: asyncio.Task[None]) -> None:
    """A writer cancelled before its first step (at shutdown) never ran `_drain`'s cleanup: it
    must not stay counted, or no writer would start again, and the units it was to write must not
    wait forever. (A writer that ran has left the lane already: nothing to do.)"""
    if writer not in lane.writers:
        return
    lane.writers.discard(writer)
    if not lane.writers:
        for unit in lane.queue:
            unit.done.cancel()
        lane.queue = []


def _cancel_queued(lane: _Lane) -> None:
    """The scheduler will not flush this lane (it stopped): its queued units are cancelled."""
    queued, lane.queue = lane.queue, []
    for unit in queued:
        unit.done.cancel()


def _settle(unit: Unit, ok: bool) -> None:
    if not unit.done.done():
        unit.done.set_result(ok)


async def _write(conn: AsyncConnection, batch: Sequence[Unit]) -> list[bool]:
    passed = await _check_guards(conn, batch)
    for units in _by_shape(batch, passed).values():
        for statement, params in _statements(units):
            await conn.execute(statement, params if len(params) > 1 else params[0])
    return passed


def _by_shape(batch: Sequence[Unit], passed: list[bool]) -> dict[Any, list[Unit]]:
    """Units of the same shape (the same statements, parameter names and order) share each
    statement's executemany; shapes run one after another, so every unit's own order is kept."""
    shapes: dict[Any, list[Unit]] = {}
    for unit, ok in zip(batch, passed, strict=True):
        if ok:
            shapes.setdefault(unit.shape, []).append(unit)
    return shapes


# Whether every statement of a shape has a plan on asyncpg, by shape, with the statements (kept,
# so that no other statement can take one's id while it is here). Shapes come from a few call
# sites; the bound only guards against a caller that builds statements afresh each time.
_TRANSLATABLE: dict[tuple[tuple[int, tuple[str, ...]], ...], tuple[tuple[sa.Executable, ...], bool]] = {}
_TRANSLATABLE_MAX = 1024


def _translatable(batch: Sequence[Unit], dialect: Dialect) -> bool:
    for unit in batch:
        known = _TRANSLATABLE.get(unit.shape)
        if known is None:
            try:
                for write in unit.writes:
                    pg.plan(write.statement, tuple(write.params), dialect)
                ok = True
            except pg.Untranslatable:
                ok = False
            if len(_TRANSLATABLE) >= _TRANSLATABLE_MAX:
                _TRANSLATABLE.clear()
            known = _TRANSLATABLE[unit.shape] = (tuple(w.statement for w in unit.writes), ok)
        if not known[1]:
            return False
    return True


async def _write_asyncpg(db: Database, batch: Sequence[Unit]) -> list[bool]:
    """`_write` on an asyncpg connection of its own (see store.pg). When every statement of the
    batch has an unnest form (nearly always), the whole batch is ONE statement: its own implicit
    transaction, with no BEGIN or COMMIT round trip, behind its guards (pg.guarded) if it has
    any. Otherwise, or when a guard failed, a transaction: the guards checked by a locking read,
    then each shape of unit's statements."""
    dialect = db.engine.dialect
    everyone = [True] * len(batch)
    guards = [unit.guard for unit in batch if unit.guard is not None]
    # Shapes in a fixed order: fewer distinct statements for the driver to prepare.
    combined = _combined(dialect, [units for _, units in sorted(_by_shape(batch, everyone).items())])
    async with db.raw() as driver:
        if combined is not None and not guards:
            await _run(driver, pg.combined(combined[0]), [combined[1]])
            return everyone
        if combined is not None and _alike(guards):
            columns = tuple(sorted(guards[0].expected))
            statement = pg.guarded(guards[0].table, columns, combined[0], dialect)
            keyed = [(g.merchant_id, g.livemode, g.id, g.expected) for g in guards]
            found = await _fetch(driver, statement.sql, (*statement.args(keyed, columns), *combined[1]))
            if len(found) == len(guards):
                return everyone
            # A guard failed, so the statement wrote nothing: which units may still write is
            # sorted out below (each guard checked on its own, in a transaction).
        async with driver.transaction():
            passed = await _check_guards_asyncpg(driver, dialect, batch)
            for sql, args in _work(dialect, batch, passed):
                await _run(driver, sql, args)
        return passed


def _alike(guards: list[Guard]) -> bool:
    """Guards on one table, each expecting the same columns: what one guarded statement checks."""
    columns = sorted(guards[0].expected)
    return all(g.table is guards[0].table and sorted(g.expected) == columns for g in guards)


def _work(dialect: Dialect, batch: Sequence[Unit], passed: list[bool]) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """(SQL, argument tuples) to run in order: one combined statement per shape of unit, or, for a
    shape with a statement that has no unnest form, its statements one after another."""
    work: list[tuple[str, list[tuple[Any, ...]]]] = []
    for units in _by_shape(batch, passed).values():
        combined = _combined(dialect, [units])
        if combined is not None:
            work.append((pg.combined(combined[0]), [combined[1]]))
        else:
            for statement, params in _statements(units):
                plan = pg.plan(statement, tuple(params[0]), dialect)
                work.append((plan.sql, plan.args(params)))
    return work


def _combined(dialect: Dialect, shapes: list[list[Unit]]) -> tuple[list[pg.Plan], tuple[Any, ...]] | None:
    """The plans of every shape's statements and all their arguments as one tuple, when each
    statement has an unnest form (one execution for all the units); None otherwise."""
    runs = [
        (pg.plan(statement, tuple(params[0]), dialect), params)
        for units in shapes
        for statement, params in _statements(units)
    ]
    if not all(plan.unnest for plan, _ in runs):
        return None
    return [plan for plan, _ in runs], tuple(value for plan, params in runs for value in plan.args(params)[0])


async def _fetch(driver: Any, sql: str, args: tuple[Any, ...]) -> list[Any]:
    rows: list[Any] = await driver.fetch(sql, *args)
    return rows


async def _run(driver: Any, sql: str, args: list[tuple[Any, ...]]) -> None:
    if len(args) == 1:
        await driver.execute(sql, *args[0])
    else:
        await driver.executemany(sql, args)


async def _check_guards_asyncpg(driver: Any, dialect: Dialect, batch: Sequence[Unit]) -> list[bool]:
    async def fetch(table: sa.Table, columns: tuple[str, ...], mine: list[Guard]) -> Any:
        keys = ([g.merchant_id for g in mine], [g.livemode for g in mine], [g.id for g in mine])
        return await driver.fetch(pg.guard_plan(table, columns, dialect).sql, *keys)

    return await _guards_hold(batch, fetch)


def _statements(units: list[Unit]) -> list[tuple[sa.Executable, list[dict[str, Any]]]]:
    """One executemany per run of consecutive writes with the same statement and parameter names
    (a transaction's journal entries, a payment's two events), across all units of one shape."""
    runs: list[tuple[sa.Executable, list[dict[str, Any]]]] = []
    previous: tuple[int, tuple[str, ...]] | None = None
    for position, first in enumerate(units[0].writes):
        shape = (id(first.statement), tuple(first.params))
        params = [unit.writes[position].params for unit in units]
        if shape == previous:
            runs[-1][1].extend(params)
        else:
            runs.append((first.statement, params))
        previous = shape
    return runs


async def _check_guards(conn: AsyncConnection, batch: Sequence[Unit]) -> list[bool]:
    async def fetch(table: sa.Table, columns: tuple[str, ...], mine: list[Guard]) -> Any:
        query = _guard_query(table, columns, conn.dialect.name == "postgresql")
        keys = [(g.merchant_id, g.livemode, g.id) for g in mine]
        return (await conn.execute(query, {"keys": keys})).mappings()

    return await _guards_hold(batch, fetch)


async def _guards_hold(
    batch: Sequence[Unit], fetch: Callable[[sa.Table, tuple[str, ...], list[Guard]], Awaitable[Any]]
) -> list[bool]:
    """Per unit: does its guard hold? One locking read per guarded table (`fetch`, per path)."""
    guards = [unit.guard for unit in batch if unit.guard is not None]
    if not guards:
        return [True] * len(batch)
    found: dict[tuple[str, bool, str], Any] = {}
    # Tables in a fixed order (by name), as rows within each are: batches cannot deadlock.
    for table in sorted({g.table for g in guards}, key=lambda t: t.name):
        mine = [g for g in guards if g.table is table]
        columns = tuple(sorted({c for g in mine for c in g.expected}))
        for row in await fetch(table, columns, mine):
            found[(row["merchant_id"], row["livemode"], row["id"])] = row
    return [unit.guard is None or _holds(found, unit.guard) for unit in batch]


@functools.cache
def _guard_query(table: sa.Table, columns: tuple[str, ...], lock: bool) -> sa.Select[Any]:
    """Built once per table and columns: the keys are one expanding parameter."""
    query = (
        sa.select(table.c.merchant_id, table.c.livemode, table.c.id, *(table.c[c] for c in columns))
        .where(sa.tuple_(table.c.merchant_id, table.c.livemode, table.c.id).in_(sa.bindparam("keys", expanding=True)))
        # A fixed lock order: two batches locking overlapping rows cannot deadlock.
        .order_by(table.c.merchant_id, table.c.id)
    )
    return query.with_for_update() if lock else query


def _holds(found: dict[tuple[str, bool, str], Any], guard: Guard) -> bool:
    row = found.get((guard.merchant_id, guard.livemode, guard.id))
    return row is not None and all(_same(row[c], v) for c, v in guard.expected.items())


def _same(stored: Any, expected: Any) -> bool:
    # SQLite hands timestamps back without their (UTC) zone.
    if isinstance(stored, dt.datetime) and isinstance(expected, dt.datetime):
        return as_utc(stored) == as_utc(expected)
    return bool(stored == expected)
