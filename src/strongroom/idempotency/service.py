"""Idempotency keys with Stripe's semantics and the IETF draft's (draft-ietf-httpapi-idempotency-key-header).

- The same key with the same request returns the stored response (status and body identical).
- The same key with a different request (method, path or parameters) is refused: idempotency_error.
- A request arriving while another holds the key gets 409 and does nothing.
- A lock older than `lock_timeout_s` belongs to a request that died: the next retry takes it over
  and resumes the object recorded at the request's recovery point (Brandur's atomic phases).
- A response is stored in the same transaction as the request's last write (`Recorder.finish`),
  so a stored response and the state it describes can never disagree.
- Keys expire after `ttl_s` (at least 24 hours).
- A key is stored only as HMAC-SHA256 under the server's key-hash secret (the one API keys are
  hashed under, with a label of its own), over the merchant, the mode and the key: nothing a
  client sends as a key is at rest (PCI DSS 3.5.1; a key may hold an order number, an e-mail
  address, or a card number that the PAN check cannot see), and one client's key tells nothing
  about another's. Computed once per request (`scoped`), as every statement's lookup value.

A claim may be deferred (`deferred`, for a route whose service writes nothing before its first
recorded write): the key's row is then not written first, on its own, but INSERTed by the
request's first recorded write, in the same commit as the service's own writes. A new key (nearly
every request) so costs no transaction of its own. A key that exists already makes that INSERT
fail (a unique violation: the commit writes nothing) or the service's refusal come before any
write; either way the request is then claimed the usual way (`NotHeld`) and runs again, so a
replay, a conflict or a mismatch is answered exactly as without deferral.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.auth.service import KeyHasher
from strongroom.errors import IdempotencyConflict, IdempotencyError, InvalidRequest
from strongroom.idempotency.tables import idempotency_keys as keys
from strongroom.redact import holds_pan
from strongroom.store.db import Database, as_utc, insert_ignore, utcnow
from strongroom.store.group import Write


class Recorder(Protocol):
    """What a service sees of idempotency: where to record progress and the final result."""

    @property
    def resume_id(self) -> str | None: ...

    async def hold(self) -> None:
        """Make sure the key is held (written) before a write the recorder does not make (see
        `deferred`); raises NotHeld when another request's record of the key exists."""

    async def checkpoint(self, conn: AsyncConnection, resource_id: str) -> None: ...

    def checkpoint_offline(self, resource_id: str) -> Finish:
        """`checkpoint` as writes to commit with the service's own."""

    async def finish(self, conn: AsyncConnection, result: object) -> None: ...

    def finish_offline(self, result: object) -> Finish | None:
        """`finish` as writes to commit with the service's own, when the response can be rendered
        without reading the database; None when it cannot (then call `finish`)."""


@dataclass(frozen=True)
class Finish:
    writes: list[Write]
    # Called once the writes are committed.
    committed: Callable[[], None]


# Nothing to record (a recorder without an idempotency key).
NO_FINISH = Finish([], lambda: None)


class _NullRecorder:
    resume_id: str | None = None

    async def hold(self) -> None:
        return None

    async def checkpoint(self, conn: AsyncConnection, resource_id: str) -> None:
        return None

    def checkpoint_offline(self, resource_id: str) -> Finish:
        return NO_FINISH

    async def finish(self, conn: AsyncConnection, result: object) -> None:
        return None

    def finish_offline(self, result: object) -> Finish | None:
        return NO_FINISH


NULL_RECORDER: Recorder = _NullRecorder()


@dataclass(frozen=True)
class Replay:
    status: int
    body: bytes


# Built once (every idempotent POST runs them): parameters by name, values bound at execution.
_BY_KEY = sa.and_(
    keys.c.merchant_id == sa.bindparam("w_merchant"),
    keys.c.livemode == sa.bindparam("w_livemode"),
    keys.c.key_hash == sa.bindparam("w_key"),
)
_INSERT = keys.insert()
_CHECKPOINT = keys.update().where(_BY_KEY).values(resource_id=sa.bindparam("w_resource"))
_STORE = (
    keys.update()
    .where(_BY_KEY)
    .values(response_status=sa.bindparam("w_status"), response_body=sa.bindparam("w_body"), locked_at=None)
)


class NotHeld(Exception):
    """A deferred claim's key has a record already (or the request was refused before it wrote
    one): claim the key the usual way, then run the request again."""


@dataclass(frozen=True)
class Key:
    """An Idempotency-Key: as the client sent it (for its own error messages, never stored) and as
    it is stored (`scoped`)."""

    text: str
    digest: bytes


def scoped(hasher: KeyHasher, merchant_id: str, livemode: bool, text: str) -> Key:
    """The key as stored: HMAC-SHA256 under the key-hash secret, bound to the merchant and mode
    (IETF draft §2: keys are scoped per client). Merchant ids hold no "/", so the message is
    unambiguous; the label keeps these digests apart from every other use of that secret."""
    mode = "live" if livemode else "test"
    return Key(text, hasher.digest(f"idempotency/key/{merchant_id}/{mode}/{text}"))


@dataclass
class Claim:
    """This request holds the key (or, deferred, will hold it with its first recorded write)."""

    merchant_id: str
    livemode: bool
    key: Key
    resume_id: str | None
    recovered: bool
    stored: bool = False
    status: int = 0
    body: bytes = b""
    # A deferred claim's row, not written yet: its first recorded write INSERTs it.
    pending: dict[str, Any] | None = None

    @property
    def held(self) -> bool:
        return self.pending is None

    def _where(self) -> sa.ColumnElement[bool]:
        return sa.and_(
            keys.c.merchant_id == self.merchant_id,
            keys.c.livemode == self.livemode,
            keys.c.key_hash == self.key.digest,
        )

    def _key(self) -> dict[str, Any]:
        return {"w_merchant": self.merchant_id, "w_livemode": self.livemode, "w_key": self.key.digest}

    async def hold(self, db: Database) -> None:
        if self.pending is None:
            return
        if await db.execute_one(insert_ignore(db.engine.dialect.name, keys), self.pending) != 1:
            raise NotHeld
        self.pending = None

    async def checkpoint(self, conn: AsyncConnection, resource_id: str) -> None:
        write = self._checkpoint_write(resource_id)
        await conn.execute(write.statement, write.params)
        self.pending, self.resume_id = None, resource_id

    def checkpoint_offline(self, resource_id: str) -> Finish:
        def committed() -> None:
            self.pending, self.resume_id = None, resource_id

        return Finish([self._checkpoint_write(resource_id)], committed)

    def _checkpoint_write(self, resource_id: str) -> Write:
        if self.pending is not None:
            return Write(_INSERT, self.pending | {"resource_id": resource_id})
        return Write(_CHECKPOINT, self._key() | {"w_resource": resource_id})

    async def store(self, conn: AsyncConnection, status: int, body: bytes) -> None:
        write = self.store_write(status, body)
        await conn.execute(write.statement, write.params)
        self.stored_as(status, body)

    def store_write(self, status: int, body: bytes) -> Write:
        """`store` as a write for a caller that commits it with others; `stored_as` once committed."""
        if self.pending is not None:
            stored = {"locked_at": None, "response_status": status, "response_body": body}
            return Write(_INSERT, self.pending | stored)
        return Write(_STORE, self._key() | {"w_status": status, "w_body": body})

    def stored_as(self, status: int, body: bytes) -> None:
        self.pending = None
        self.stored, self.status, self.body = True, status, body

    async def release(self, db: Database) -> None:
        """Forget the key: the request failed before it changed anything, so a retry may run it."""
        async with db.tx() as conn:
            await conn.execute(keys.delete().where(self._where(), keys.c.response_status.is_(None)))


def fingerprint(method: str, path: str, params: dict[str, Any]) -> bytes:
    canonical = orjson.dumps([method, path, params], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).digest()


def validate_key(key: str, max_length: int) -> str:
    if not key or len(key) > max_length or not key.isprintable() or not key.isascii():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {max_length} printable ASCII characters.",
            code="idempotency_key_invalid",
        )
    if holds_pan(key):
        # Echoed in responses and logs (PCI DSS 3.4.1). The detector leaves UUIDs and hex strings
        # alone, so random keys (the stripe SDKs' UUIDs, hex digests) are never refused.
        raise InvalidRequest(
            "Idempotency-Key must not contain a card number; use a random value such as a UUID.",
            code="idempotency_key_invalid",
        )
    return key


def deferred(principal: Principal, key: Key, method: str, path: str, params: dict[str, Any]) -> Claim:
    """A claim of a key believed new, written by the request's first recorded write (see the
    module's docstring). The service must write nothing before that, or call `hold` first."""
    now = utcnow()
    row = _new_row(principal, key, fingerprint(method, path, params), method, path, now)
    return Claim(principal.merchant_id, principal.livemode, key, resume_id=None, recovered=False, pending=row)


def _new_row(principal: Principal, key: Key, fp: bytes, method: str, path: str, now: dt.datetime) -> dict[str, Any]:
    return {
        "merchant_id": principal.merchant_id,
        "livemode": principal.livemode,
        "key_hash": key.digest,
        "fingerprint": fp,
        "method": method,
        "path": path,
        "created": now,
        "locked_at": now,
    }


async def claim(
    db: Database,
    principal: Principal,
    key: Key,
    method: str,
    path: str,
    params: dict[str, Any],
    *,
    lock_timeout_s: float,
    ttl_s: float,
) -> Replay | Claim:
    fp = fingerprint(method, path, params)
    now = utcnow()
    fresh = Claim(principal.merchant_id, principal.livemode, key, resume_id=None, recovered=False)
    new_row = _new_row(principal, key, fp, method, path, now)
    # A new key (nearly every request) is claimed by one autocommitted statement; only a key
    # seen before needs the locking read below.
    if await db.execute_one(insert_ignore(db.engine.dialect.name, keys), new_row) == 1:
        return fresh
    for _ in range(_CLAIM_ATTEMPTS):
        async with db.tx() as conn:
            inserted = await conn.execute(insert_ignore(conn.dialect.name, keys), new_row)
            if inserted.rowcount == 1:
                return fresh
            query = sa.select(keys).where(fresh._where())
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            row = (await conn.execute(query)).first()
            if row is None:
                # Gone between the two statements: the request holding it was refused and
                # released it (Claim.release). The key is free: claim it again.
                continue
            return await _judge(conn, fresh, row, fp, method, path, now, lock_timeout_s=lock_timeout_s, ttl_s=ttl_s)
    raise _in_progress(key.text)


# A key released again and again between our insert and our read is still being fought over.
_CLAIM_ATTEMPTS = 3


async def _judge(
    conn: AsyncConnection,
    fresh: Claim,
    row: Any,
    fp: bytes,
    method: str,
    path: str,
    now: dt.datetime,
    *,
    lock_timeout_s: float,
    ttl_s: float,
) -> Replay | Claim:
    """An earlier request's record of this key (locked): replay it, refuse, or take it over."""
    if as_utc(row.created) < now - dt.timedelta(seconds=ttl_s):
        await _restart(conn, fresh, fp, method, path, now)
        return fresh
    if row.fingerprint != fp:
        raise IdempotencyError(
            "Keys for idempotent requests can only be used with the same parameters they were "
            "first used with. Try using a key other than '" + fresh.key.text + "' if you meant to execute "
            "a different request.",
            code="idempotency_key_in_use",
        )
    if row.response_status is not None:
        return Replay(status=row.response_status, body=bytes(row.response_body))
    if row.locked_at is not None and as_utc(row.locked_at) > now - dt.timedelta(seconds=lock_timeout_s):
        raise _in_progress(fresh.key.text)
    await conn.execute(keys.update().where(fresh._where()).values(locked_at=now))
    return Claim(fresh.merchant_id, fresh.livemode, fresh.key, resume_id=row.resource_id, recovered=True)


def _in_progress(key: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        "There is currently another in-progress request using this Idempotent Key (that "
        "probably means you submitted twice, and the other request is still going through): "
        + key
        + ". Please try again later.",
        code="idempotency_key_in_use",
    )


async def _restart(conn: AsyncConnection, claim_: Claim, fp: bytes, method: str, path: str, now: dt.datetime) -> None:
    await conn.execute(
        keys.update()
        .where(claim_._where())
        .values(
            fingerprint=fp,
            method=method,
            path=path,
            created=now,
            locked_at=now,
            resource_id=None,
            response_status=None,
            response_body=None,
        )
    )


async def purge_expired(db: Database, *, ttl_s: float, batch: int) -> int:
    """Delete keys older than the TTL, at most `batch` at a time (bounded work per call).

    A key still locked is skipped unless its lock is itself older than the TTL: that request
    died long ago (`claim` already treats the key as new), and its row must not live forever."""
    cutoff = utcnow() - dt.timedelta(seconds=ttl_s)
    async with db.tx() as conn:
        victims = (
            await conn.execute(
                sa.select(keys.c.merchant_id, keys.c.livemode, keys.c.key_hash)
                .where(keys.c.created < cutoff, sa.or_(keys.c.locked_at.is_(None), keys.c.locked_at < cutoff))
                .limit(batch)
            )
        ).all()
        for v in victims:
            await conn.execute(
                keys.delete().where(
                    keys.c.merchant_id == v.merchant_id,
                    keys.c.livemode == v.livemode,
                    keys.c.key_hash == v.key_hash,
                )
            )
    return len(victims)
