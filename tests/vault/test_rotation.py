"""Key rotation (issue 4 item 6; SECURITY.md P6, P7): online, resumable, scheduled, and under load.

Rotations here run the way `strongroom keys rotate` runs them: from a vault of their own (another
process, as far as the keys are concerned) on the same database and HSM token as the api.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pkcs11
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pkcs11 import Attribute, ObjectClass
from pkcs11.exceptions import UserAlreadyLoggedIn
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent
from typer.testing import CliRunner

from strongroom.app import create_app
from strongroom.cli import app as cli
from strongroom.sensitive import Secret
from strongroom.settings import Settings
from strongroom.store.db import Database
from strongroom.store.migrate import upgrade
from strongroom.vault import rotation
from strongroom.vault.keystore import open_keystore
from strongroom.vault.pkcs11 import LIBRARY_LOCK
from strongroom.vault.service import CvcCache, Vault, aad
from strongroom.vault.tables import vault_cards, vault_keks, vault_keys

from .conftest import USER_PIN, hsm_settings

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"
AMEX = "378282246310005"
FAST = {"dek_cache_ttl_s": 0.3, "retired_key_grace_s": 0}


def _hsm_labels(softhsm, token: str) -> set[str]:
    """What the HSM holds, through a session of the test's own (under the process-wide library
    lock: a scheduled rotation may be calling the HSM from a worker thread meanwhile)."""
    with LIBRARY_LOCK:
        handle = pkcs11.lib(str(softhsm.module)).get_token(token_label=token)
        try:
            session = handle.open(user_pin=USER_PIN)
        except UserAlreadyLoggedIn:
            session = handle.open()
        try:
            objects = session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})
            return {str(obj[Attribute.LABEL]) for obj in objects}
        finally:
            session.close()


async def _rows(db: Database, table: sa.Table) -> list[sa.RowMapping]:
    async with db.read() as conn:
        return list((await conn.execute(sa.select(table))).mappings().all())


async def _store_cards(vault: Vault, merchant_id: str, numbers: list[str]) -> list[str]:
    tokens = []
    async with vault.keys.db.tx() as conn:
        for number in numbers:
            tokens.append((await vault.tokenize(conn, merchant_id, Secret(number), None)).token)
    return tokens


async def _reveal_all(vault: Vault, merchant_id: str, tokens: list[str]) -> list[str]:
    async with vault.keys.db.read() as conn:
        return [(await vault.reveal(conn, merchant_id, token)).reveal() for token in tokens]


async def test_p7_retired_versions_destroyed_once_unreferenced(make_vault, softhsm, hsm_token):
    numbers = [VISA, MASTERCARD, AMEX] * 4
    async with make_vault(dek_cache_ttl_s=0.3, retired_key_grace_s=3600) as vault:
        tokens = await _store_cards(vault, "acct_p7", numbers)
        report = await rotation.rotate(vault, vault.keys.settings)
        # Re-wrapped and re-encrypted at once, but within the grace period nothing is destroyed.
        assert (report.started, report.kek_version, report.rewrapped, report.reencrypted) == (True, 2, 1, 12)
        assert report.keks_destroyed == [] and report.deks_destroyed == 0
        assert {"strongroom-kek-v1", "strongroom-kek-v2"} <= _hsm_labels(softhsm, hsm_token)
    await asyncio.sleep(0.35)  # past the shortest grace allowed: dek_cache_ttl_s
    async with make_vault(**FAST) as later:
        report = await rotation.rotate(later, later.keys.settings, new_version=False)
        assert (report.keks_destroyed, report.deks_destroyed) == ([1], 1)
        assert await _reveal_all(later, "acct_p7", tokens) == numbers
        keks = {row["version"]: row for row in await _rows(later.keys.db, vault_keks)}
        deks = await _rows(later.keys.db, vault_keys)
    labels = _hsm_labels(softhsm, hsm_token)
    assert "strongroom-kek-v1" not in labels  # the HSM object itself is gone
    assert "strongroom-kek-v2" in labels
    assert (keks[1]["state"], keks[2]["state"]) == ("destroyed", "active")
    assert keks[1]["destroyed"] is not None
    destroyed = [dek for dek in deks if dek["state"] == "destroyed"]
    assert len(destroyed) == 1 and bytes(destroyed[0]["wrapped_key"]) == b""
    assert {dek["kek_version"] for dek in deks if dek["state"] != "destroyed"} == {2}


async def test_p7_a_key_still_referenced_is_not_destroyed(make_vault):
    async with make_vault(**FAST) as vault:
        good, bad = await _store_cards(vault, "acct_ref", [VISA, AMEX])
        async with vault.keys.db.tx() as conn:
            where = (vault_cards.c.merchant_id == "acct_ref", vault_cards.c.token == bad)
            await conn.execute(vault_cards.update().where(*where).values(nonce=b"\x00" * 12))
        first = (await _rows(vault.keys.db, vault_keys))[0]["id"]
        await asyncio.sleep(0.35)
        report = await rotation.rotate(vault, vault.keys.settings)
        assert report.unreadable == 1  # the tampered card is left in place, as evidence
        await asyncio.sleep(0.35)
        later = await rotation.rotate(vault, vault.keys.settings, new_version=False)
        deks = {row["id"]: row for row in await _rows(vault.keys.db, vault_keys)}
        assert await _reveal_all(vault, "acct_ref", [good]) == [VISA]
    assert deks[first]["state"] == "retired"  # its DEK is still referenced: kept
    assert deks[first]["kek_version"] == 2  # but re-wrapped, so KEK v1 could go
    assert (later.keks_destroyed, later.deks_destroyed) == ([1], 0)


async def test_rotation_resumes_after_a_crash(make_vault):
    async with make_vault(dek_max_encryptions=10, dek_reserve_block=4, **FAST) as vault:
        numbers = [VISA, AMEX] * 15
        tokens = await _store_cards(vault, "acct_crash", numbers)
        assert len(await _rows(vault.keys.db, vault_keys)) == 3
        # The process dies right after the first step: KEK v2 exists and is active, nothing was
        # re-wrapped or re-encrypted yet.
        await rotation._start(vault, vault.keys.settings)
    async with make_vault(dek_max_encryptions=10, dek_reserve_block=4, **FAST) as rerun:
        work = await rotation.pending_work(rerun.keys.db)
        assert (work.rewrap, work.reencrypt) == (3, 30)
        progress = (await rotation.status_lines(rerun))[-1]
        assert "3 DEKs to re-wrap, 30 cards to re-encrypt" in progress
        report = await rotation.rotate(rerun, rerun.keys.settings)  # `strongroom keys rotate`, again
        assert (report.started, report.kek_version, report.rewrapped, report.reencrypted) == (False, 2, 3, 30)
        await asyncio.sleep(0.35)
        await rotation.rotate(rerun, rerun.keys.settings, new_version=False)
        assert not (await rotation.pending_work(rerun.keys.db)).any
        assert await _reveal_all(rerun, "acct_crash", tokens) == numbers
        # Nothing left to continue: the next `keys rotate` starts version 3.
        assert (await rotation.rotate(rerun, rerun.keys.settings)).kek_version == 3


@pytest.fixture
async def rotating_app(softhsm, hsm_token, fresh_database_url, tmp_path) -> AsyncIterator[tuple[Any, Settings]]:
    """The api on the SoftHSM2 keystore, with its scheduled rotation checking every 0.3 s and a KEK
    crypto-period of two seconds."""
    settings = hsm_settings(
        softhsm,
        hsm_token,
        fresh_database_url,
        tmp_path,
        kek_crypto_period_days=2 / 86400,
        rotation_interval_s=0.3,
        **FAST,
    )
    application = create_app(settings, background=True)
    async with application.router.lifespan_context(application):
        yield application, settings


@pytest.fixture
async def hsm_api_app(softhsm, hsm_token, fresh_database_url, tmp_path) -> AsyncIterator[tuple[Any, Settings]]:
    """The api on the SoftHSM2 keystore; rotations are explicit (no schedule)."""
    settings = hsm_settings(softhsm, hsm_token, fresh_database_url, tmp_path, rotation_enabled=False, **FAST)
    application = create_app(settings, background=False)
    async with application.router.lifespan_context(application):
        yield application, settings


async def test_p6_scheduled_rotation_rotates_when_the_crypto_period_ends(rotating_app, softhsm, hsm_token):
    application, _ = rotating_app
    vault = application.state.services.payments.vault
    tokens = await _store_cards(vault, "acct_sched", [VISA, AMEX])
    first = (await _rows(vault.keys.db, vault_keks))[0]
    assert as_seconds(first["rotate_after"] - first["created"]) == pytest.approx(2.0)
    for _ in range(100):  # bounded wait: 10 s
        keks = {row["version"]: row["state"] for row in await _rows(vault.keys.db, vault_keks)}
        if keks.get(1) == "destroyed" and "active" in keks.values():
            break
        await asyncio.sleep(0.1)
    assert keks[1] == "destroyed", keks
    assert max(keks) >= 2
    assert "strongroom-kek-v1" not in _hsm_labels(softhsm, hsm_token)
    assert await _reveal_all(vault, "acct_sched", tokens) == [VISA, AMEX]


def as_seconds(delta: dt.timedelta) -> float:
    return delta.total_seconds()


async def test_rotation_under_concurrent_payments_and_tokenizations_loses_nothing(hsm_api_app):
    """On PostgreSQL when the session runs there (CI): real concurrent connections."""
    application, settings = hsm_api_app
    services = application.state.services
    merchants = [await new_merchant(services, f"Rotation load {i}") for i in range(3)]
    created: list[tuple[str, str, str]] = []
    paid: list[str] = []
    stop = asyncio.Event()

    async def load(merchant: Any, numbers: itertools.cycle[str]) -> None:
        transport = httpx.ASGITransport(app=application)
        headers = {"Authorization": f"Bearer {merchant.secret_key}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as api:
            for _ in range(400):  # bounded; normally ended by `stop`
                if stop.is_set():
                    return
                number = next(numbers)
                pm = await card_payment_method(api, number)
                created.append((merchant.id, pm["id"], number))
                intent = await create_intent(api, payment_method=pm["id"], confirm="true", amount=1234)
                assert intent["status"] == "succeeded", intent
                paid.append(intent["id"])

    workers = [
        asyncio.create_task(load(m, itertools.cycle([VISA, MASTERCARD, AMEX][i:] + [VISA, MASTERCARD, AMEX][:i])))
        for i, m in enumerate(merchants)
    ]
    await asyncio.sleep(0.5)
    reports = []
    for _ in range(2):
        report = await rotation.run(settings, lambda v: rotation.rotate(v, settings.vault, new_version=True))
        reports.append(report)
        await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*workers)
    # Cards stored under a block reserved just before a rotation are picked up by the next run.
    await asyncio.sleep(0.35)
    await rotation.run(settings, lambda v: rotation.rotate(v, settings.vault, new_version=False))

    assert [r.kek_version for r in reports] == [2, 3]
    assert sum(r.reencrypted for r in reports) > 0
    assert len(created) >= 9
    vault = services.payments.vault
    async with services.db.read() as conn:
        for merchant_id, pm_id, number in created:
            token = await conn.scalar(
                sa.text("SELECT vault_token FROM payment_methods WHERE merchant_id = :m AND id = :pm"),
                {"m": merchant_id, "pm": pm_id},
            )
            assert (await vault.reveal(conn, merchant_id, token)).reveal() == number
        ids = [m.id for m in merchants]
        stored = await conn.scalar(sa.select(sa.func.count()).where(vault_cards.c.merchant_id.in_(ids)))
        succeeded = await conn.scalar(
            sa.text("SELECT count(*) FROM payment_intents WHERE status = 'succeeded' AND merchant_id IN (:a, :b, :c)"),
            dict(zip("abc", ids, strict=True)),
        )
    assert stored == len(created)
    assert succeeded == len(paid)
    keks = {row["version"]: row["state"] for row in await _rows(services.db, vault_keks)}
    assert keks == {1: "destroyed", 2: "destroyed", 3: "active"}
    live = [row for row in await _rows(services.db, vault_keys) if row["state"] != "destroyed"]
    assert {row["kek_version"] for row in live} == {3}
    assert not (await rotation.pending_work(services.db)).any


def test_keys_cli_rotates_and_reports_status(tmp_path: Path):
    runner = CliRunner()
    rotated = runner.invoke(cli, ["keys", "rotate", "--data-dir", str(tmp_path)])
    assert rotated.exit_code == 0, rotated.output
    assert "rotated to KEK v1" in rotated.output
    rotated = runner.invoke(cli, ["keys", "rotate", "--data-dir", str(tmp_path)])
    assert "rotated to KEK v2" in rotated.output
    status = runner.invoke(cli, ["keys", "status", "--data-dir", str(tmp_path)])
    assert status.exit_code == 0, status.output
    assert "keystore: development" in status.output
    assert "KEK v2 [active]" in status.output
    assert "KEK v1 [retired]" in status.output  # within its grace period
    assert "0 DEKs to re-wrap, 0 cards to re-encrypt" in status.output


async def test_cards_stored_before_envelope_encryption_stay_readable_and_rotation_migrates_them(tmp_path: Path):
    """Development data from before migration 0005: encrypted under one HKDF-derived key. The
    development keystore still opens it (KEK version 0), and a rotation re-encrypts it."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'legacy.db'}"
    await asyncio.to_thread(upgrade, url, "0004")
    root = b"\x07" * 32
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "dev-kek.key").write_bytes(root)
    (tmp_path / "keys" / "dev-kek.key").chmod(0o600)
    legacy = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"strongroom/vault/pan-encryption/v1")
    nonce = b"\x01" * 12
    ciphertext = AESGCM(legacy.derive(root)).encrypt(nonce, AMEX.encode(), aad("acct_old", "card_old"))
    db = Database(url)
    async with db.tx() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO vault_cards (merchant_id, token, key_version, nonce, ciphertext, created) "
                "VALUES ('acct_old', 'card_old', 1, :n, :c, '2026-01-01 00:00:00')"
            ),
            {"n": nonce, "c": ciphertext},
        )
    await db.dispose()
    await asyncio.to_thread(upgrade, url)

    settings = Settings(data_dir=tmp_path, database_url=url, vault=FAST)
    db = Database(url)
    vault = Vault(db, open_keystore(settings), CvcCache(1.0, 1), settings.vault)
    try:
        assert await _reveal_all(vault, "acct_old", ["card_old"]) == [AMEX]
        assert (await rotation.pending_work(db)).rewrap == 1  # the placeholder DEK of KEK version 0
        await asyncio.sleep(0.35)
        report = await rotation.rotate(vault, settings.vault)
        assert (report.reencrypted, report.keks_destroyed) == (1, [0])
        assert await _reveal_all(vault, "acct_old", ["card_old"]) == [AMEX]
        card = (await _rows(db, vault_cards))[0]
        assert card["dek_id"] != "dek_legacy_hkdf_v1"
    finally:
        vault.close()
        await db.dispose()
