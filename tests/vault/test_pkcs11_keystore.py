"""The PKCS#11 keystore against SoftHSM2 (SECURITY.md P4, P5, P6, C3), and keystore selection.

Key attributes are read back from the HSM through a session of the test's own, not through the
keystore under test, so the answers are the device's, not our code's opinion of itself.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import stat
from collections.abc import Iterator
from pathlib import Path

import pkcs11
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error, UserAlreadyLoggedIn

from strongroom.sensitive import Secret
from strongroom.settings import Settings
from strongroom.store.db import as_utc
from strongroom.vault.keystore import DevelopmentKeystore, KeyMissing, VaultIntegrityError, open_keystore
from strongroom.vault.pkcs11 import FINGERPRINT_LABEL, LIBRARY_LOCK, Pkcs11Keystore
from strongroom.vault.service import aad
from strongroom.vault.tables import vault_cards, vault_keks, vault_keys

from .conftest import USER_PIN, SoftHsm, keystore_of

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"


@pytest.fixture
def hsm_session(softhsm: SoftHsm, hsm_token: str) -> Iterator[pkcs11.Session]:
    """An independent session on the test's token, to inspect what the keystore left there."""
    token = pkcs11.lib(str(softhsm.module)).get_token(token_label=hsm_token)
    try:
        session = token.open(rw=True, user_pin=USER_PIN)
    except UserAlreadyLoggedIn:
        session = token.open(rw=True)
    try:
        yield session
    finally:
        session.close()


def _only(session: pkcs11.Session, label: str) -> pkcs11.Object:
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))
    assert len(found) == 1, f"expected one object labelled {label}, found {len(found)}"
    return found[0]


async def test_p5_kek_is_non_extractable_and_sensitive(make_vault, hsm_session):
    async with make_vault() as vault, vault.keys.db.tx() as conn:
        await vault.tokenize(conn, "acct_p5", Secret(VISA), None)

    kek = _only(hsm_session, "strongroom-kek-v1")
    assert kek[Attribute.EXTRACTABLE] is False
    assert kek[Attribute.SENSITIVE] is True
    assert kek[Attribute.NEVER_EXTRACTABLE] is True
    assert kek[Attribute.TOKEN] is True
    assert kek[Attribute.KEY_TYPE] == KeyType.AES
    assert kek[Attribute.VALUE_LEN] == 32
    # Asking the device for the key's value, or to export it wrapped, is refused.
    with pytest.raises(PKCS11Error):
        kek[Attribute.VALUE]
    exporter = hsm_session.generate_key(KeyType.AES, 256, capabilities=MechanismFlag.WRAP)
    with pytest.raises(PKCS11Error):
        exporter.wrap_key(kek, mechanism=Mechanism.AES_KEY_WRAP_PAD)
    # The KEK is separate from the DEKs (P5): the database holds only DEKs wrapped by it.
    async with make_vault() as vault, vault.keys.db.read() as conn:
        wrapped = (await conn.execute(sa.select(vault_keys.c.wrapped_key))).scalars().all()
    assert len(wrapped) == 1
    assert len(bytes(wrapped[0])) == 40


async def test_p6_kek_generated_in_the_hsm_with_a_crypto_period(make_vault, hsm_session):
    async with make_vault(kek_crypto_period_days=30, dek_crypto_period_days=7) as vault:
        async with vault.keys.db.tx() as conn:
            await vault.tokenize(conn, "acct_p6", Secret(VISA), None)
        async with vault.keys.db.read() as conn:
            kek_row = (await conn.execute(sa.select(vault_keks))).mappings().one()

    kek = _only(hsm_session, "strongroom-kek-v1")
    # CKA_LOCAL: generated on the device (C_GenerateKey), never imported.
    assert kek[Attribute.LOCAL] is True
    assert kek_row["keystore"] == "pkcs11"
    assert kek_row["state"] == "active"
    assert as_utc(kek_row["rotate_after"]) - as_utc(kek_row["created"]) == dt.timedelta(days=30)


async def test_c3_deks_are_wrapped_with_ckm_aes_key_wrap_pad_rfc5649(make_vault, hsm_session):
    """SoftHSM2 2.6 implements CKM_AES_KEY_WRAP_PAD, so no fallback to CKM_AES_KEY_WRAP is used."""
    async with make_vault() as vault:
        async with vault.keys.db.tx() as conn:
            stored = await vault.tokenize(conn, "acct_c3", Secret(VISA), None)
        async with vault.keys.db.read() as conn:
            card = (await conn.execute(sa.select(vault_cards))).mappings().one()
            wrapped = bytes(await conn.scalar(sa.select(vault_keys.c.wrapped_key)))

    kek = _only(hsm_session, "strongroom-kek-v1")
    template = {Attribute.TOKEN: False, Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False}
    dek = kek.unwrap_key(
        ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP_PAD, template=template
    )
    # The unwrapped DEK opens the stored card: the wrap was RFC 5649 around the DEK itself.
    plaintext = AESGCM(bytes(dek[Attribute.VALUE])).decrypt(
        bytes(card["nonce"]), bytes(card["ciphertext"]), aad("acct_c3", stored.token)
    )
    assert plaintext.decode() == VISA
    # RFC 3394 (no padding) has a different integrity check value: it refuses the same blob.
    with pytest.raises(PKCS11Error):
        kek.unwrap_key(
            ObjectClass.SECRET_KEY, KeyType.AES, wrapped, mechanism=Mechanism.AES_KEY_WRAP, template=template
        )


async def test_p4_fingerprint_is_an_hmac_keyed_inside_the_hsm_per_merchant(make_vault, hsm_session):
    async with make_vault() as first, make_vault() as second:
        a1 = await first.fingerprint("acct_a", Secret(VISA))
        a2 = await second.fingerprint("acct_a", Secret(VISA))  # another process, same HSM key
        b1 = await first.fingerprint("acct_b", Secret(VISA))
        other_card = await first.fingerprint("acct_a", Secret(MASTERCARD))
    assert a1 == a2
    assert a1 != b1
    assert a1 != other_card
    assert a1 not in hashlib.sha256(VISA.encode()).hexdigest()  # not a plain hash of the PAN

    key = _only(hsm_session, FINGERPRINT_LABEL)
    assert key[Attribute.KEY_TYPE] == KeyType.GENERIC_SECRET
    assert key[Attribute.EXTRACTABLE] is False
    assert key[Attribute.SENSITIVE] is True
    # Recomputed with the HSM's HMAC: the merchant key is HMAC-SHA256(HSM key, merchant id).
    merchant_key = bytes(key.sign(b"acct_a", mechanism=Mechanism.SHA256_HMAC))
    assert hmac.new(merchant_key, VISA.encode(), hashlib.sha256).hexdigest()[:16] == a1


async def test_hsm_is_off_the_per_request_path(make_vault):
    """After the first card, tokenizing and revealing keep working with the HSM session closed:
    the DEK, its reserved block and the merchant's fingerprint key are all in memory."""
    async with make_vault() as vault:
        async with vault.keys.db.tx() as conn:
            first = await vault.tokenize(conn, "acct_hot", Secret(VISA), None)
        keystore_of(vault).close()
        async with vault.keys.db.tx() as conn:
            stored = [await vault.tokenize(conn, "acct_hot", Secret(MASTERCARD), None) for _ in range(200)]
            assert (await vault.reveal(conn, "acct_hot", first.token)).reveal() == VISA
            assert {(await vault.reveal(conn, "acct_hot", s.token)).reveal() for s in stored} == {MASTERCARD}
        assert {s.fingerprint for s in stored} == {await vault.fingerprint("acct_hot", Secret(MASTERCARD))}


def test_production_refuses_the_development_keystore_unless_allowed(softhsm: SoftHsm, tmp_path: Path):
    with pytest.raises(RuntimeError, match="HSM"):
        open_keystore(Settings(data_dir=tmp_path, development=False))
    allowed = open_keystore(Settings(data_dir=tmp_path, development=False, vault={"allow_development_keystore": True}))
    assert isinstance(allowed, DevelopmentKeystore)
    with pytest.raises(RuntimeError, match="TOKEN_LABEL"):
        open_keystore(Settings(data_dir=tmp_path, development=False, hsm_module=softhsm.module))
    assert isinstance(open_keystore(Settings(data_dir=tmp_path, development=True)), DevelopmentKeystore)


def test_development_keystore_files_are_0600_and_every_start_warns(tmp_path: Path, capfd):
    first = DevelopmentKeystore(tmp_path / "keys")
    first.create_kek(1)
    DevelopmentKeystore(tmp_path / "keys")
    files = sorted((tmp_path / "keys").iterdir())
    assert [f.name for f in files] == ["dev-kek.key", "vault-kek-v1.key"]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o600}
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    assert capfd.readouterr().out.count("DEVELOPMENT KEYSTORE") == 2
    dek, wrapped = first.new_dek(1)
    assert first.unwrap(1, wrapped) == dek
    first.destroy_kek(1)
    assert not (tmp_path / "keys" / "vault-kek-v1.key").exists()


def test_pkcs11_keystore_refuses_a_wrong_pin(softhsm: SoftHsm, hsm_token: str):
    with pytest.raises(PKCS11Error):
        Pkcs11Keystore(softhsm.module, hsm_token, Secret("not-the-pin"))


def test_p7_a_kek_destroyed_by_another_session_is_missing_not_tampering(softhsm, hsm_token):
    """The api caches its KEK handles while a rotation job's keystore (its own session) destroys
    old versions: the api must then report the key as missing (a key-management state) and never
    as an integrity failure, which pages someone for tampering. Later versions keep working."""
    api = Pkcs11Keystore(softhsm.module, hsm_token, Secret(USER_PIN))
    job = Pkcs11Keystore(softhsm.module, hsm_token, Secret(USER_PIN))
    try:
        api.create_kek(1)
        dek, wrapped_v1 = api.new_dek(1)
        assert api.unwrap(1, wrapped_v1).reveal() == dek.reveal()  # the v1 handle is now cached
        job.create_kek(2)
        wrapped_v2 = job.wrap(2, dek)
        job.destroy_kek(1)
        with pytest.raises(KeyMissing):
            api.unwrap(1, wrapped_v1)
        assert api.unwrap(2, wrapped_v2).reveal() == dek.reveal()
        with pytest.raises(VaultIntegrityError):
            api.unwrap(2, wrapped_v2[:-1] + bytes([wrapped_v2[-1] ^ 1]))  # tampering is still caught
    finally:
        job.close()
        api.close()


def test_a_session_the_hsm_dropped_is_opened_again_not_reported_as_tampering(softhsm, hsm_token, capfd):
    """Seen once in CI: the api's session became unknown to the HSM while a rotation job's keystore
    worked beside it, and every unwrap then failed as "wrapped_dek" tampering. A session the HSM
    no longer knows (closed under the keystore, an HSM restart) is replaced, its handles looked up
    again, and the operation runs once more; tampering is still caught afterwards."""
    keystore = Pkcs11Keystore(softhsm.module, hsm_token, Secret(USER_PIN))
    try:
        keystore.create_kek(1)
        dek, wrapped = keystore.new_dek(1)
        assert keystore.unwrap(1, wrapped).reveal() == dek.reveal()  # the KEK handle is cached
        with LIBRARY_LOCK:
            keystore._session.close()  # dropped behind the keystore's back (and logged out)
        assert keystore.unwrap(1, wrapped).reveal() == dek.reveal()
        assert "vault.hsm_session_reopened" in capfd.readouterr().out
        other, other_wrapped = keystore.new_dek(1)
        assert keystore.unwrap(1, other_wrapped).reveal() == other.reveal()
        with pytest.raises(VaultIntegrityError):
            keystore.unwrap(1, wrapped[:-1] + bytes([wrapped[-1] ^ 1]))
    finally:
        keystore.close()
