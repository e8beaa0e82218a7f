"""Data-encryption keys: envelope encryption, per-DEK encryption budgets, in-memory caches.

A card is encrypted under a DEK (AES-256-GCM, 96-bit random nonce); the DEK is stored in
`vault_keys` only wrapped by a KEK in the keystore. The per-request path never calls the keystore:
unwrapped DEKs are cached for `vault.dek_cache_ttl_s`, and a process reserves encryptions of the
active DEK in blocks of `vault.dek_reserve_block` with one UPDATE … RETURNING, so the count of
encryptions per DEK is enforced across processes without a database write per encryption.

NIST SP 800-38D §8.3 (SECURITY.md C1): with random 96-bit nonces a key must not see more than
2^32 encryptions; a DEK is retired when its reserved count reaches `vault.dek_max_encryptions`
(default 2^24), or when its crypto-period (`vault.dek_crypto_period_days`, SECURITY.md C2) ends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.settings import VaultSettings
from strongroom.store.db import Database, as_utc, utcnow
from strongroom.vault.keystore import KeyMissing, Keystore, VaultIntegrityError
from strongroom.vault.tables import vault_keks, vault_keys

log = structlog.get_logger(__name__)

ACTIVE, RETIRED, DESTROYED = "active", "retired", "destroyed"
_REFILL_ATTEMPTS = 3

_reserve = (
    vault_keys.update()
    .where(
        vault_keys.c.id == sa.bindparam("w_id"),
        vault_keys.c.state == ACTIVE,
        vault_keys.c.encryptions_reserved < sa.bindparam("w_max"),
    )
    .values(encryptions_reserved=vault_keys.c.encryptions_reserved + sa.bindparam("w_block"))
    .returning(vault_keys.c.encryptions_reserved, vault_keys.c.created)
)


@dataclass
class _Grant:
    """Encryptions [next, end) of one DEK reserved for this process, usable until `expires`."""

    dek_id: str
    aead: AESGCM
    next: int
    end: int
    expires: float
    valid: bool = True

    def take(self) -> bool:
        if not self.valid or self.next >= self.end or time.monotonic() >= self.expires:
            return False
        self.next += 1
        return True

    def running_low(self, block: int, ttl_s: float) -> bool:
        """A quarter of the block or of its lifetime left: time to reserve the next one."""
        return self.end - self.next <= block // 4 or self.expires - time.monotonic() < ttl_s / 4


def crypto_period(days: float) -> dt.timedelta:
    return dt.timedelta(days=days)


async def active_kek_version(conn: AsyncConnection) -> int | None:
    query = sa.select(sa.func.max(vault_keks.c.version)).where(vault_keks.c.state == ACTIVE)
    version: int | None = await conn.scalar(query)
    return version


async def new_kek(conn: AsyncConnection, keystore: Keystore, settings: VaultSettings) -> int:
    """Claims the next KEK version and generates it in the keystore, in the caller's transaction.

    The INSERT of the version's primary key is the claim: a concurrent claimant of the same version
    waits for this transaction and then fails, so only one process ever generates a given version
    (two HSM objects under one label would be ambiguous). If this transaction dies after the
    keystore generated the key, the next claimant of the version adopts it (`create_kek` is
    idempotent)."""
    latest = await conn.scalar(sa.select(sa.func.max(vault_keks.c.version)))
    version = (latest or 0) + 1
    now = utcnow()
    await conn.execute(
        vault_keks.insert().values(
            version=version,
            keystore=keystore.name,
            state=ACTIVE,
            created=now,
            rotate_after=now + crypto_period(settings.kek_crypto_period_days),
        )
    )
    # PCI DSS 3.7.1 (SECURITY.md P6): generated inside the keystore, never imported.
    await asyncio.to_thread(keystore.create_kek, version)
    return version


class DataKeys:
    """This process's view of the DEKs: the reserved block of the active DEK, and unwrapped DEKs."""

    def __init__(self, db: Database, keystore: Keystore, settings: VaultSettings) -> None:
        self.db = db
        self.keystore = keystore
        self.settings = settings
        self._grant: _Grant | None = None
        self._lock = asyncio.Lock()
        # The block reserved ahead (PostgreSQL), used once the current one is spent: nothing of a
        # block is wasted by reserving early.
        self._next: _Grant | None = None
        self._refreshing: asyncio.Task[None] | None = None
        self._cache: OrderedDict[str, tuple[float, AESGCM]] = OrderedDict()

    def forget(self) -> None:
        """Drops the reserved block and every unwrapped DEK (after a rotation in this process)."""
        self._grant = self._next = None
        self._cache.clear()

    async def for_encryption(self, conn: AsyncConnection) -> tuple[str, AESGCM]:
        """The DEK for one more encryption; one counted use of its budget."""
        grant = self._take()
        if grant is not None:
            return grant.dek_id, grant.aead
        async with self._lock:  # also waits for a reservation ahead that is under way
            for _ in range(_REFILL_ATTEMPTS):
                grant = self._take()
                if grant is not None:
                    return grant.dek_id, grant.aead
                # A fresh block holds at least one encryption, unless it outlived
                # `dek_cache_ttl_s` while the keystore unwrapped its DEK.
                self._grant = await self._refill(conn)
            raise RuntimeError("could not reserve encryptions of a data-encryption key")

    def _take(self) -> _Grant | None:
        """One encryption of the current block, or of the block reserved ahead once it is spent."""
        grant = self._grant
        if grant is not None and grant.take():
            low = grant.running_low(self.settings.dek_reserve_block, self.settings.dek_cache_ttl_s)
            if low and self._next is None and not self.db.is_sqlite:
                self._refresh_in_background()
            return grant
        ahead, self._next = self._next, None
        if ahead is not None and ahead.take():
            self._grant = ahead
            return ahead
        return None

    async def warm(self) -> None:
        """Reserve a block before the first request needs one (PostgreSQL, at start-up)."""
        if not self.db.is_sqlite:
            await self._refresh()

    def _refresh_in_background(self) -> None:
        # On PostgreSQL a reservation takes a connection of its own; taken inside a request's
        # transaction it needs a second one, which an exhausted pool cannot give (each request
        # would hold one and wait for another). So the next block is reserved ahead, off the
        # request path, and the nested reservation only happens if this one falls behind.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        async with self._lock:
            try:
                async with self.db.tx() as own:
                    # Ahead of need, a block of the active DEK only: a new DEK is created when one
                    # is needed (once per DEK lifetime), not speculatively.
                    grant = await self._reserve_or_create(own, create=self._grant is None)
            except (sa.exc.SQLAlchemyError, VaultIntegrityError) as exc:
                # Logged (integrity failures at critical level already); a request that needs the
                # key meets the same failure and answers it cleanly.
                log.warning("vault.dek_reserve_failed", error_type=type(exc).__name__)
                return
            if grant is None:
                return
            if self._grant is None:
                self._grant = grant
            else:
                self._next = grant

    async def _refill(self, conn: AsyncConnection) -> _Grant:
        """Reserves a block, creating a DEK when none is active.

        On PostgreSQL the reservation commits in a transaction of its own, so a rollback of the
        caller's transaction cannot hand the same encryptions out twice. On SQLite the caller
        already holds the only write lock (a second transaction would wait for it forever), so the
        reservation joins the caller's transaction and is dropped from memory if that rolls back;
        no other transaction can have used it meanwhile, as SQLite admits one writer at a time."""
        for _ in range(_REFILL_ATTEMPTS):
            if self.db.is_sqlite:
                grant = await self._reserve_or_create(conn)
                if grant is not None:
                    _drop_on_rollback(conn, grant)
                    return grant
                continue
            try:
                async with self.db.tx() as own:
                    grant = await self._reserve_or_create(own)
            except sa.exc.IntegrityError:
                continue  # another process claimed the first KEK version at the same moment
            if grant is not None:
                return grant
        raise RuntimeError("could not reserve encryptions of a data-encryption key")

    async def _reserve_or_create(self, conn: AsyncConnection, *, create: bool = True) -> _Grant | None:
        query = sa.select(vault_keys).where(vault_keys.c.state == ACTIVE).order_by(vault_keys.c.created.desc())
        found = (await conn.execute(query.limit(1))).mappings().first()
        if found is None and not create:
            return None
        row = dict(found) if found is not None else await self._create_dek(conn)
        block = min(self.settings.dek_reserve_block, self.settings.dek_max_encryptions)
        params = {"w_id": row["id"], "w_max": self.settings.dek_max_encryptions, "w_block": block}
        reserved = (await conn.execute(_reserve, params)).first()
        if reserved is None:
            await self._retire(conn, row["id"])  # its budget is spent (or a rotation retired it)
            return None
        reserved_to, created = reserved
        if as_utc(created) + crypto_period(self.settings.dek_crypto_period_days) <= utcnow():
            await self._retire(conn, row["id"])
            return None
        if reserved_to >= self.settings.dek_max_encryptions:
            await self._retire(conn, row["id"])  # this block is the last one anybody gets
        aead = await self.aead(row["id"], row["kek_version"], bytes(row["wrapped_key"]))
        end = min(reserved_to, self.settings.dek_max_encryptions)
        expires = time.monotonic() + self.settings.dek_cache_ttl_s
        return _Grant(row["id"], aead, reserved_to - block, end, expires)

    async def _create_dek(self, conn: AsyncConnection) -> dict[str, Any]:
        version = await active_kek_version(conn)
        if version is None:
            version = await new_kek(conn, self.keystore, self.settings)
        dek, wrapped = await asyncio.to_thread(self.keystore.new_dek, version)
        row = {
            "id": "dek_" + secrets.token_hex(12),
            "kek_version": version,
            "wrapped_key": wrapped,
            "state": ACTIVE,
            "created": utcnow(),
            "retired": None,
            "encryptions_reserved": 0,
        }
        await conn.execute(vault_keys.insert().values(**row))
        self._remember(str(row["id"]), AESGCM(dek.reveal()))
        log.info("vault.dek_created", dek_id=row["id"], kek_version=version)
        return row

    async def _retire(self, conn: AsyncConnection, dek_id: str) -> None:
        where = (vault_keys.c.id == dek_id, vault_keys.c.state == ACTIVE)
        await conn.execute(vault_keys.update().where(*where).values(state=RETIRED, retired=utcnow()))

    async def aead(self, dek_id: str, kek_version: int, wrapped: bytes) -> AESGCM:
        """The unwrapped DEK, from memory or (once per `dek_cache_ttl_s`) from the keystore."""
        cached = self._cache.get(dek_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            dek = await asyncio.to_thread(self.keystore.unwrap, kek_version, wrapped)
        except KeyMissing:
            # A destroyed or unknown KEK for a DEK something still references: the wrapped key's
            # binding to its KEK was altered, or key management went wrong. Either way, alarm.
            log.critical("vault.integrity_failure", what="kek_missing", dek_id=dek_id, kek_version=kek_version)
            raise VaultIntegrityError() from None
        except VaultIntegrityError:
            log.critical("vault.integrity_failure", what="wrapped_dek", dek_id=dek_id, kek_version=kek_version)
            raise
        aead = AESGCM(dek.reveal())
        self._remember(dek_id, aead)
        return aead

    def _remember(self, dek_id: str, aead: AESGCM) -> None:
        self._cache[dek_id] = (time.monotonic() + self.settings.dek_cache_ttl_s, aead)
        self._cache.move_to_end(dek_id)
        while len(self._cache) > self.settings.dek_cache_max:
            self._cache.popitem(last=False)


def _drop_on_rollback(conn: AsyncConnection, grant: _Grant) -> None:
    """Invalidates `grant` if the transaction that reserved it rolls back. Each listener fires once;
    the one for the outcome that did not happen fires later on another transaction and is a no-op."""
    sync = conn.sync_connection
    if sync is None:
        raise RuntimeError("connection is closed")
    settled = False

    def rolled_back(_conn: Any) -> None:
        nonlocal settled
        if not settled:
            settled = True
            grant.valid = False

    def committed(_conn: Any) -> None:
        nonlocal settled
        settled = True

    sa.event.listen(sync, "rollback", rolled_back, once=True)
    sa.event.listen(sync, "commit", committed, once=True)
