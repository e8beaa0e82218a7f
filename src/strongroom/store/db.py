"""The async engine and its transactions, for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from strongroom.store.flush import FlushScheduler
from strongroom.store.reads import GroupRead


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def sqlite_url_for(path: str) -> str:
    return f"sqlite+aiosqlite:///{path}"


def private_sqlite_file(url: str) -> None:
    """An SQLite database file readable by its owner only (0600), created so before SQLite opens
    it: SQLite gives its `-wal` and `-shm` files the database file's permissions, whatever the
    umask. A file already there with wider permissions is narrowed, its `-wal`/`-shm` too."""
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError, FileNotFoundError):  # no directory: SQLite says so
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


class Database:
    """Owns the engine. One transaction per unit of work: `async with db.tx() as conn`."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        pool_timeout_s: float = 30.0,
        raw_pool_size: int = 10,
        read_gather_turns: int = 0,
        flush_max_wait_s: float = 0.0,
        echo: bool = False,
    ) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {
            "echo": echo,
            "json_serializer": _json_dumps,
            "json_deserializer": orjson.loads,
        }
        if self.is_sqlite:
            private_sqlite_file(url)
            # One file shared by many connections: WAL lets readers run beside the single
            # writer, and busy_timeout makes a second writer wait instead of failing.
            kwargs["connect_args"] = {"timeout": 30}
        else:
            # No overflow: an overflow connection is closed as soon as it is handed back, and under
            # load that meant a new PostgreSQL backend (fork, authentication, statements prepared
            # again) every few requests: 13 a second at 2 x 32 clients, about a fifth of the CPU.
            # Past the pool a request waits for a connection (pool_timeout_s) instead.
            kwargs.update(pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s, pool_pre_ping=False)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine)
        self._raw_pool_size = raw_pool_size
        # Connections of each loop's pool checked out by raw() (the pools belong to loops).
        self._raw_out: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
        self._pool_timeout_s = pool_timeout_s
        # asyncpg pools belong to the event loop that made them.
        self._raw_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Any]] = (
            weakref.WeakKeyDictionary()
        )
        # `fetch_one` lookups of one statement arriving together go as one (store.reads).
        # Group commit's and group reads' statements, one at a time per loop, the fullest lane
        # first (store.flush); off (0) leaves each lane its own writer.
        self.flushes = FlushScheduler(max_wait_s=flush_max_wait_s) if flush_max_wait_s > 0 else None
        self._reads = GroupRead(self.raw, gather_turns=read_gather_turns, scheduler=self.flushes)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def tx(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn

    @asynccontextmanager
    async def single(self) -> AsyncIterator[AsyncConnection]:
        """For ONE statement that needs no transaction around it (a lookup by key, an append-only
        insert): autocommit, so it costs one round trip instead of BEGIN, statement, COMMIT. Each
        statement commits (durably) on its own: never use it for two that must commit together."""
        if self.is_sqlite:
            # pysqlite's AUTOCOMMIT hands pooled connections back with its own implicit
            # transactions re-enabled; SQLite runs the statement in a short transaction instead.
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @asynccontextmanager
    async def raw(self) -> AsyncIterator[Any]:
        """PostgreSQL only: an asyncpg connection, from a small pool kept beside SQLAlchemy's, for
        the hot statements compiled once by store.pg. Checking a connection out of
        SQLAlchemy's pool and running one statement through it cost about 250 µs of CPU; here
        about 40 µs (measured on this machine)."""
        loop = asyncio.get_running_loop()
        creating = self._raw_pools.get(loop)
        if creating is None:
            creating = loop.create_task(self._create_raw_pool())
            self._raw_pools[loop] = creating
        pool = await creating
        # While a connection is free, acquire cannot wait for one: its timeout (asyncpg runs it
        # through asyncio.wait_for, a task per call: 15.6 instead of 10 µs an acquire and release,
        # measured) is only set when all are out. One event loop per pool, so no race.
        out = self._raw_out.get(loop, 0)
        self._raw_out[loop] = out + 1
        try:
            async with pool.acquire(timeout=None if out < self._raw_pool_size else self._pool_timeout_s) as conn:
                yield conn
        finally:
            self._raw_out[loop] -= 1

    async def _create_raw_pool(self) -> Any:
        import asyncpg

        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        # Every statement on these connections finds its rows by key (a primary key, or `= ANY`
        # of keys), and asyncpg keeps each one prepared for the connection's life, so PostgreSQL
        # soon settles on a generic plan. Made while a table was small (a new deployment, the
        # benchmark's fresh database), that plan was a sequential scan and stayed one as the table
        # grew: seen, 3.2 M rows read in a 10 s run by batches of about 5 keys. No seqscan here.
        # And planned once: under the default `auto` PostgreSQL kept making a custom plan at every
        # execution of the batch statements (an array's or JSON document's length makes each
        # custom plan look cheaper than the generic one), planning a many-CTE statement per batch.
        # Forcing the generic plan cut PostgreSQL's CPU per payment by about a fifth on the
        # benchmark (2.4/2.8/2.1 -> 2.0/1.9/1.2 ms, interleaved runs); every statement here is by key.
        settings = {"enable_seqscan": "off", "plan_cache_mode": "force_generic_plan"}
        return await asyncpg.create_pool(
            dsn,
            min_size=0,
            max_size=self._raw_pool_size,
            init=_raw_codecs,
            reset=_keep_session,
            max_inactive_connection_lifetime=0,
            server_settings=settings,
        )

    async def fetch_one(self, statement: sa.Executable, params: Mapping[str, Any]) -> dict[str, Any] | None:
        """One row of one statement that needs no transaction around it (autocommit)."""
        if self.is_sqlite:
            async with self.single() as conn:
                row = (await conn.execute(statement, dict(params))).mappings().first()
                return None if row is None else dict(row)
        from strongroom.store import pg

        return await self._reads.fetch_one(pg.plan(statement, tuple(params), self.engine.dialect), params)

    async def execute_one(self, statement: sa.Executable, params: Mapping[str, Any]) -> int:
        """One statement on its own (autocommit, durable when it returns); the rows it changed."""
        if self.is_sqlite:
            async with self.single() as conn:
                return int((await conn.execute(statement, dict(params))).rowcount)
        from strongroom.store import pg

        plan = pg.plan(statement, tuple(params), self.engine.dialect)
        async with self.raw() as conn:
            status: str = await conn.execute(plan.sql, *plan.args([params])[0])
        return int(status.rsplit(" ", 1)[-1]) if status[-1:].isdigit() else 0

    async def dispose(self) -> None:
        loop = asyncio.get_running_loop()
        for owner, creating in list(self._raw_pools.items()):
            if not creating.done() or creating.cancelled() or creating.exception() is not None:
                continue
            if owner is loop:
                await creating.result().close()
            else:
                creating.result().terminate()
        self._raw_pools.clear()
        await self.engine.dispose()


async def _raw_codecs(conn: Any) -> None:
    """JSON as SQLAlchemy's asyncpg dialect has it: parameters arrive serialized (the column type's
    bind processor), results are parsed."""
    for name in ("json", "jsonb"):
        await conn.set_type_codec(name, encoder=_same, decoder=orjson.loads, schema="pg_catalog", format="text")


async def _keep_session(conn: Any) -> None:
    """Nothing to reset on release: these connections never change session settings, LISTEN or
    take advisory locks (asyncpg still rolls back an open transaction first). The default reset
    is one more round trip per checkout."""


def _same(value: str) -> str:
    return value


def _configure_sqlite(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so that BEGIN IMMEDIATE below is ours:
        # a writer then holds the lock from its first statement, and read-modify-write
        # sequences cannot interleave (SQLite's equivalent of SELECT … FOR UPDATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


_INSERT_IGNORE: dict[tuple[str, str], Any] = {}


def insert_ignore(dialect: str, table: sa.Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the dialect (by name), built once per table (it is on
    the payment path): execute it with the row as parameters, `conn.execute(stmt, row)`."""
    key = (dialect, table.name)
    statement = _INSERT_IGNORE.get(key)
    if statement is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement = pg_insert(table).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(table).on_conflict_do_nothing()
        _INSERT_IGNORE[key] = statement
    return statement


def epoch_s(value: dt.datetime | None) -> int | None:
    """Unix seconds, as Stripe renders `created`."""
    return None if value is None else int(as_utc(value).timestamp())
