"""The async engine and its transactions, for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """SQLite returns naive datetimes; everything we store is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def sqlite_url_for(path: str) -> str:
    return f"sqlite+aiosqlite:///{path}"


class Database:
    """Owns the engine. One transaction per unit of work: `async with db.tx() as conn`."""

    def __init__(self, url: str, *, pool_size: int = 20, pool_timeout_s: float = 30.0, echo: bool = False) -> None:
        parsed = make_url(url)
        self.url = url
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {
            "echo": echo,
            "json_serializer": _json_dumps,
            "json_deserializer": orjson.loads,
        }
        if self.is_sqlite:
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

    async def dispose(self) -> None:
        await self.engine.dispose()


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


def insert_ignore(conn: AsyncConnection, table: sa.Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the connection's dialect, built once per table (it is on
    the payment path): execute it with the row as parameters, `conn.execute(stmt, row)`."""
    key = (conn.dialect.name, table.name)
    statement = _INSERT_IGNORE.get(key)
    if statement is None:
        if conn.dialect.name == "postgresql":
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
