"""Key rotation (PCI DSS 3.6.1.x / 3.7.1-3.7.5, SECURITY.md P6, P7): `strongroom keys rotate`, and
the same on a schedule when the active KEK's crypto-period ends.

A rotation, online, while payments run:
1. start: in one transaction, claim KEK version N+1 and generate it in the keystore, retire the
   previous KEK and every active DEK (new cards then go to a fresh DEK wrapped by N+1);
2. re-wrap every DEK still under an older KEK, one row at a time (compare-and-set on its KEK
   version, so a crash or a concurrent rotator loses nothing);
3. re-encrypt the cards of the DEKs it retired under fresh DEKs, in batches (compare-and-set on
   the card's DEK);
4. destroy what nothing references any more (PCI DSS 3.7.5): retired DEKs (the wrapped key is
   erased) and retired KEK versions (the keystore object is destroyed), each only after
   `vault.retired_key_grace_s`, longer than any process may still encrypt with a reserved block.

Every step is an idempotent scan of everything not yet done, whichever rotation left it, so
rerunning after a crash continues where it stopped: while DEKs are left to re-wrap or cards to
re-encrypt, `strongroom keys rotate` finishes them instead of starting another version.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog

from strongroom.settings import Settings, VaultSettings
from strongroom.store.db import Database, as_utc, utcnow
from strongroom.vault.keys import ACTIVE, DESTROYED, RETIRED, active_kek_version, new_kek
from strongroom.vault.keystore import KeyMissing, VaultIntegrityError, open_keystore
from strongroom.vault.service import CvcCache, Vault, open_sealed, seal
from strongroom.vault.tables import vault_cards, vault_keks, vault_keys

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass
class RotationReport:
    kek_version: int
    started: bool  # False: an unfinished rotation was continued
    rewrapped: int = 0
    reencrypted: int = 0
    unreadable: int = 0
    deks_destroyed: int = 0
    keks_destroyed: list[int] = field(default_factory=list)


def _grace(settings: VaultSettings) -> dt.timedelta:
    return dt.timedelta(seconds=max(settings.retired_key_grace_s, settings.dek_cache_ttl_s))


# DEKs a rotation replaces: retired, and created before the active KEK was. A DEK retired later
# for its encryption budget or crypto-period still decrypts; its cards wait for the next rotation
# (re-encrypting them now would spend fresh budgets and retire DEKs without end).
_active_kek_created = sa.select(sa.func.max(vault_keks.c.created)).where(vault_keks.c.state == ACTIVE).scalar_subquery()
_replaced = sa.and_(vault_keys.c.state == RETIRED, vault_keys.c.created < _active_kek_created)
_referenced = sa.exists().where(vault_cards.c.dek_id == vault_keys.c.id)


@dataclass(frozen=True)
class Work:
    """What rotations have left to do."""

    rewrap: int  # DEKs under a KEK version other than the active one
    reencrypt: int  # cards under a DEK that a rotation replaced
    deks_to_destroy: int  # retired DEKs no card references (destroyed past the grace period)
    keks_to_destroy: int  # retired KEK versions (likewise)

    @property
    def resumable(self) -> bool:
        return bool(self.rewrap or self.reencrypt)

    @property
    def any(self) -> bool:
        return bool(self.rewrap or self.reencrypt or self.deks_to_destroy or self.keks_to_destroy)


async def pending_work(db: Database) -> Work:
    count = sa.select(sa.func.count())
    async with db.read() as conn:
        active = await active_kek_version(conn)
        live = count.select_from(vault_keys).where(vault_keys.c.state != DESTROYED)
        if active is not None:
            live = live.where(vault_keys.c.kek_version != active)
        cards = count.select_from(vault_cards.join(vault_keys, vault_keys.c.id == vault_cards.c.dek_id))
        return Work(
            rewrap=await conn.scalar(live) or 0,
            reencrypt=await conn.scalar(cards.where(_replaced)) or 0,
            deks_to_destroy=await conn.scalar(
                count.select_from(vault_keys).where(vault_keys.c.state == RETIRED, ~_referenced)
            )
            or 0,
            keks_to_destroy=await conn.scalar(count.select_from(vault_keks).where(vault_keks.c.state == RETIRED)) or 0,
        )


async def due(db: Database) -> bool:
    """The active KEK's crypto-period (`vault.kek_crypto_period_days`) has ended."""
    async with db.read() as conn:
        query = sa.select(vault_keks.c.rotate_after).where(vault_keks.c.state == ACTIVE)
        ends = (await conn.execute(query)).scalars().all()
    return any(as_utc(end) <= utcnow() for end in ends)


async def tick(vault: Vault, settings: VaultSettings) -> RotationReport | None:
    """The scheduled job: rotate when the active KEK's crypto-period has ended; otherwise carry on
    with whatever an earlier rotation left (destructions waiting out their grace period)."""
    db = vault.keys.db
    if await due(db):
        return await rotate(vault, settings, new_version=True)
    if (await pending_work(db)).any:
        return await rotate(vault, settings)
    return None


async def rotate(vault: Vault, settings: VaultSettings, *, new_version: bool | None = None) -> RotationReport:
    """`new_version`: True starts a new KEK version even if an earlier rotation is unfinished;
    False only continues; None (`strongroom keys rotate`) continues an interrupted rotation (DEKs
    left to re-wrap or cards to re-encrypt) and otherwise starts a new one."""
    db = vault.keys.db
    if new_version is None:
        new_version = not (await pending_work(db)).resumable
    report = None if new_version else await _current(db)
    if report is None:  # a new version was asked for, or there is no active one to continue with
        report = await _start(vault, settings)
    vault.keys.forget()
    await _rewrap(vault, settings, report)
    await _reencrypt(vault, settings, report)
    await _destroy_deks(vault, settings, report)
    await _destroy_keks(vault, settings, report)
    log.info("vault.rotation", **{k: v for k, v in report.__dict__.items() if k != "keks_destroyed"})
    return report


async def _current(db: Database) -> RotationReport | None:
    async with db.read() as conn:
        active = await active_kek_version(conn)
    return None if active is None else RotationReport(kek_version=active, started=False)


async def _start(vault: Vault, settings: VaultSettings) -> RotationReport:
    db = vault.keys.db
    now = utcnow()
    try:
        async with db.tx() as conn:
            await conn.execute(
                vault_keks.update().where(vault_keks.c.state == ACTIVE).values(state=RETIRED, retired=now)
            )
            await conn.execute(
                vault_keys.update().where(vault_keys.c.state == ACTIVE).values(state=RETIRED, retired=now)
            )
            version = await new_kek(conn, vault.keystore, settings)
    except sa.exc.IntegrityError:
        # Another rotator claimed the same version first: continue its rotation instead.
        current = await _current(db)
        if current is None:
            raise
        return current
    log.info("vault.kek_rotated", kek_version=version, keystore=vault.keystore.name)
    return RotationReport(kek_version=version, started=True)


async def _rewrap(vault: Vault, settings: VaultSettings, report: RotationReport) -> None:
    db, keystore, target = vault.keys.db, vault.keystore, report.kek_version
    last = ""
    while True:
        query = (
            sa.select(vault_keys.c.id, vault_keys.c.kek_version, vault_keys.c.wrapped_key)
            .where(vault_keys.c.state != DESTROYED, vault_keys.c.kek_version != target, vault_keys.c.id > last)
            .order_by(vault_keys.c.id)
            .limit(settings.rotation_batch)
        )
        async with db.read() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return
        for dek_id, old_version, wrapped in rows:
            last = dek_id
            try:
                dek = await asyncio.to_thread(keystore.unwrap, old_version, bytes(wrapped))
            except (VaultIntegrityError, KeyMissing):
                log.critical("vault.integrity_failure", what="wrapped_dek", dek_id=dek_id, kek_version=old_version)
                report.unreadable += 1
                continue
            rewrapped = await asyncio.to_thread(keystore.wrap, target, dek)
            async with db.tx() as conn:
                changed = await conn.execute(
                    vault_keys.update()
                    .where(vault_keys.c.id == dek_id, vault_keys.c.kek_version == old_version)
                    .values(kek_version=target, wrapped_key=rewrapped)
                )
            report.rewrapped += changed.rowcount


async def _reencrypt(vault: Vault, settings: VaultSettings, report: RotationReport) -> None:
    db = vault.keys.db
    last: tuple[str, str] = ("", "")
    while True:
        async with db.tx() as conn:
            rows = (await conn.execute(_retired_cards(last, settings.rotation_batch))).mappings().all()
            if not rows:
                return
            for row in rows:
                last = (row["merchant_id"], row["token"])
                await _reencrypt_one(vault, conn, row, report)


def _retired_cards(after: tuple[str, str], limit: int) -> sa.Select[Any]:
    c = vault_cards.c
    return (
        sa.select(
            c.merchant_id, c.token, c.dek_id, c.nonce, c.ciphertext, vault_keys.c.kek_version, vault_keys.c.wrapped_key
        )
        .select_from(vault_cards.join(vault_keys, vault_keys.c.id == c.dek_id))
        .where(_replaced, sa.tuple_(c.merchant_id, c.token) > sa.tuple_(*after))
        .order_by(c.merchant_id, c.token)
        .limit(limit)
    )


async def _reencrypt_one(vault: Vault, conn: Any, row: Any, report: RotationReport) -> None:
    merchant_id, token, old_dek = row["merchant_id"], row["token"], row["dek_id"]
    try:
        old = await vault.keys.aead(old_dek, row["kek_version"], bytes(row["wrapped_key"]))
        pan = open_sealed(old, merchant_id, token, bytes(row["nonce"]), bytes(row["ciphertext"]), old_dek)
    except VaultIntegrityError:
        # Left where it is, as evidence; its DEK stays referenced and is never destroyed.
        report.unreadable += 1
        return
    dek_id, aead = await vault.keys.for_encryption(conn)
    nonce, ciphertext = seal(aead, merchant_id, token, pan)
    c = vault_cards.c
    changed = await conn.execute(
        vault_cards.update()
        .where(c.merchant_id == merchant_id, c.token == token, c.dek_id == old_dek)
        .values(dek_id=dek_id, nonce=nonce, ciphertext=ciphertext)
    )
    report.reencrypted += changed.rowcount


async def _destroy_deks(vault: Vault, settings: VaultSettings, report: RotationReport) -> None:
    db, cutoff = vault.keys.db, utcnow() - _grace(settings)
    async with db.read() as conn:
        query = sa.select(vault_keys.c.id, vault_keys.c.retired).where(vault_keys.c.state == RETIRED, ~_referenced)
        candidates = [dek_id for dek_id, retired in await conn.execute(query) if as_utc(retired) <= cutoff]
    for dek_id in candidates:
        async with db.tx() as conn:
            destroyed = await conn.execute(
                vault_keys.update()
                .where(vault_keys.c.id == dek_id, vault_keys.c.state == RETIRED, ~_referenced)
                # Crypto-shredding: without the wrapped key the DEK is gone, whatever KEK survives.
                .values(state=DESTROYED, wrapped_key=b"")
            )
        report.deks_destroyed += destroyed.rowcount


async def _destroy_keks(vault: Vault, settings: VaultSettings, report: RotationReport) -> None:
    db, cutoff = vault.keys.db, utcnow() - _grace(settings)
    async with db.read() as conn:
        query = sa.select(vault_keks.c.version, vault_keks.c.retired).where(vault_keks.c.state == RETIRED)
        candidates = [version for version, retired in await conn.execute(query) if as_utc(retired) <= cutoff]
    protects = sa.exists().where(vault_keys.c.kek_version == vault_keks.c.version, vault_keys.c.state != DESTROYED)
    for version in candidates:
        async with db.tx() as conn:
            claimed = await conn.execute(
                vault_keks.update()
                .where(vault_keks.c.version == version, vault_keks.c.state == RETIRED, ~protects)
                .values(state=DESTROYED, destroyed=utcnow())
            )
            if claimed.rowcount:
                # Destroyed before the row says so: a crash in between leaves the row `retired`
                # and the next run's destroy is a no-op, never a key that outlives its record.
                await asyncio.to_thread(vault.keystore.destroy_kek, version)
                report.keks_destroyed.append(version)


@dataclass(frozen=True)
class KekVersion:
    version: int
    keystore: str
    state: str
    created: dt.datetime
    rotate_after: dt.datetime
    in_keystore: bool  # the key object/file exists (False once destroyed: PCI DSS 3.7.5)
    deks: dict[str, int]  # DEKs it wraps, by state
    cards: int  # cards whose DEK it wraps


async def status(vault: Vault) -> list[KekVersion]:
    """`strongroom keys status`: every KEK version, what it protects, and whether it still exists."""
    db = vault.keys.db
    async with db.read() as conn:
        keks = (await conn.execute(sa.select(vault_keks).order_by(vault_keks.c.version))).mappings().all()
        by_state = sa.select(vault_keys.c.kek_version, vault_keys.c.state, sa.func.count()).group_by(
            vault_keys.c.kek_version, vault_keys.c.state
        )
        deks: dict[int, dict[str, int]] = {}
        for version, state, n in await conn.execute(by_state):
            deks.setdefault(version, {})[state] = n
        per_kek = (
            sa.select(vault_keys.c.kek_version, sa.func.count())
            .select_from(vault_cards.join(vault_keys, vault_keys.c.id == vault_cards.c.dek_id))
            .group_by(vault_keys.c.kek_version)
        )
        cards: dict[int, int] = {version: n for version, n in await conn.execute(per_kek)}
    present = set(await asyncio.to_thread(vault.keystore.kek_versions))
    return [
        KekVersion(
            version=row["version"],
            keystore=row["keystore"],
            state=row["state"],
            created=as_utc(row["created"]),
            rotate_after=as_utc(row["rotate_after"]),
            in_keystore=row["version"] in present,
            deks=deks.get(row["version"], {}),
            cards=cards.get(row["version"], 0),
        )
        for row in keks
    ]


async def run(settings: Settings, job: Callable[[Vault], Awaitable[T]]) -> T:
    """Runs `job` with a vault of its own (the `strongroom keys` commands), on the vault's own
    database when it has one (segmentation), else the main one."""
    db = Database(settings.vault.database_url or settings.effective_database_url)
    vault = Vault(db, open_keystore(settings), CvcCache(1.0, 1), settings.vault)
    try:
        return await job(vault)
    finally:
        vault.close()
        await db.dispose()


async def status_lines(vault: Vault) -> list[str]:
    versions = await status(vault)
    work = await pending_work(vault.keys.db)
    lines = [f"keystore: {vault.keystore.name} ({vault.keystore.wrap_mechanism})"]
    for kek in versions:
        deks = ", ".join(f"{n} {state}" for state, n in sorted(kek.deks.items())) or "none"
        lines.append(
            f"KEK v{kek.version} [{kek.state}] created {kek.created:%Y-%m-%d %H:%M}Z, crypto-period ends "
            f"{kek.rotate_after:%Y-%m-%d %H:%M}Z, in keystore: {'yes' if kek.in_keystore else 'no'}; "
            f"protects {kek.cards} cards through DEKs: {deks}"
        )
    if not versions:
        lines.append("no key versions yet (the first card stored creates them)")
    lines.append(
        f"rotation progress: {work.rewrap} DEKs to re-wrap, {work.reencrypt} cards to re-encrypt, "
        f"{work.deks_to_destroy} retired DEKs and {work.keks_to_destroy} retired KEK versions to destroy"
    )
    return lines
