"""Tokenization: the narrow interface through which the payments domain stores a card.

The payments domain hands a PAN in (as a `Secret`) and gets back a random token, the card's
non-sensitive facts and a keyed fingerprint. It never gets the PAN back: processors are reached
through connectors that hold only `CardRef`s, and only the vault's relay calls `reveal`.

Each PAN is AES-256-GCM ciphertext under a data-encryption key (`strongroom.vault.keys`), with a
fresh 96-bit random nonce and additional authenticated data binding it to its merchant and token.
Any modification (ciphertext, nonce, wrapped DEK, or the row moved to another merchant or token)
raises `VaultIntegrityError` with an alert-level log line; it never decrypts to garbage.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.errors import ResourceMissing
from strongroom.sensitive import Secret
from strongroom.settings import VaultSettings
from strongroom.store.db import Database, utcnow
from strongroom.vault.keys import DataKeys
from strongroom.vault.keystore import Keystore, VaultIntegrityError
from strongroom.vault.tables import vault_cards, vault_keys

log = structlog.get_logger(__name__)

NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit random nonces


@dataclass(frozen=True)
class StoredCard:
    token: str
    fingerprint: str


def aad(merchant_id: str, token: str) -> bytes:
    # Binds the ciphertext to its row: copied to another merchant or token, it fails to open.
    return f"strongroom/vault/v1|{merchant_id}|{token}".encode()


class CvcCache:
    """CVCs in memory only (PCI DSS 3.3.1.2: never stored after authorization), bounded in size and age."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._items: OrderedDict[tuple[str, str], tuple[float, Secret[str]]] = OrderedDict()

    def put(self, merchant_id: str, token: str, cvc: Secret[str]) -> None:
        self._expire()
        self._items[(merchant_id, token)] = (time.monotonic() + self._ttl_s, cvc)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def take(self, merchant_id: str, token: str) -> Secret[str] | None:
        """Hands the CVC out once and forgets it."""
        self._expire()
        item = self._items.pop((merchant_id, token), None)
        return item[1] if item else None

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items:
            key, (deadline, _) = next(iter(self._items.items()))
            if deadline > now:
                break
            del self._items[key]


class FingerprintKeys:
    """Per-merchant fingerprint keys, computed by the keystore (inside the HSM) once per merchant
    and `vault.fingerprint_key_ttl_s`, so that fingerprinting never waits on the HSM per request."""

    def __init__(self, keystore: Keystore, ttl_s: float, max_entries: int) -> None:
        self._keystore = keystore
        self._ttl_s = ttl_s
        self._max = max_entries
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get(self, merchant_id: str) -> bytes:
        item = self._items.get(merchant_id)
        if item is not None and item[0] > time.monotonic():
            return item[1]
        key = (await asyncio.to_thread(self._keystore.merchant_fingerprint_key, merchant_id)).reveal()
        self._items[merchant_id] = (time.monotonic() + self._ttl_s, key)
        self._items.move_to_end(merchant_id)
        while len(self._items) > self._max:
            self._items.popitem(last=False)
        return key


# Built once: constructing and compiling a statement per call costs more than the encryption.
_insert_card = vault_cards.insert()
_card_with_key = (
    sa.select(
        vault_cards.c.dek_id,
        vault_cards.c.nonce,
        vault_cards.c.ciphertext,
        vault_keys.c.kek_version,
        vault_keys.c.wrapped_key,
    )
    .select_from(vault_cards.outerjoin(vault_keys, vault_keys.c.id == vault_cards.c.dek_id))
    .where(vault_cards.c.merchant_id == sa.bindparam("m"), vault_cards.c.token == sa.bindparam("t"))
)


class Vault:
    def __init__(self, db: Database, keystore: Keystore, cvc_cache: CvcCache, settings: VaultSettings) -> None:
        self.keystore = keystore
        self.keys = DataKeys(db, keystore, settings)
        self.fingerprints = FingerprintKeys(
            keystore, settings.fingerprint_key_ttl_s, settings.fingerprint_key_cache_max
        )
        self.cvcs = cvc_cache

    async def fingerprint(self, merchant_id: str, pan: Secret[str]) -> str:
        """PCI DSS 3.5.1.1 (SECURITY.md P4): a keyed HMAC under the merchant's key, so the same
        card has one fingerprint per merchant and different ones across merchants."""
        key = await self.fingerprints.get(merchant_id)
        return hmac.new(key, pan.reveal().encode(), hashlib.sha256).hexdigest()[:16]

    async def tokenize(
        self, conn: AsyncConnection, merchant_id: str, pan: Secret[str], cvc: Secret[str] | None
    ) -> StoredCard:
        token = "card_" + secrets.token_urlsafe(24)
        fingerprint = await self.fingerprint(merchant_id, pan)
        dek_id, aead = await self.keys.for_encryption(conn)
        nonce, ciphertext = seal(aead, merchant_id, token, pan)
        await conn.execute(
            _insert_card,
            {
                "merchant_id": merchant_id,
                "token": token,
                "dek_id": dek_id,
                "nonce": nonce,
                "ciphertext": ciphertext,
                "created": utcnow(),
            },
        )
        if cvc is not None:
            self.cvcs.put(merchant_id, token, cvc)
        return StoredCard(token=token, fingerprint=fingerprint)

    async def reveal(self, conn: AsyncConnection, merchant_id: str, token: str) -> Secret[str]:
        """The card number, for the relay only. Another merchant's token is indistinguishable from
        a missing one (SECURITY.md T3)."""
        row = (await conn.execute(_card_with_key, {"m": merchant_id, "t": token})).mappings().first()
        return await self._open(row, merchant_id, token)

    async def reveal_alone(self, db: Database, merchant_id: str, token: str) -> Secret[str]:
        """`reveal` with its read as one statement on its own (the relay's, on every payment)."""
        return await self._open(await db.fetch_one(_card_with_key, {"m": merchant_id, "t": token}), merchant_id, token)

    async def _open(self, row: Mapping[Any, Any] | None, merchant_id: str, token: str) -> Secret[str]:
        if row is None:
            raise ResourceMissing("card", token, param=None)
        if row["wrapped_key"] is None:
            log.critical("vault.integrity_failure", what="dek_missing", merchant_id=merchant_id, dek_id=row["dek_id"])
            raise VaultIntegrityError()
        aead = await self.keys.aead(row["dek_id"], row["kek_version"], bytes(row["wrapped_key"]))
        return open_sealed(aead, merchant_id, token, bytes(row["nonce"]), bytes(row["ciphertext"]), row["dek_id"])

    def discard_cvc(self, merchant_id: str, token: str) -> None:
        """Called after the first authorization attempt: the CVC must not outlive it."""
        self.cvcs.take(merchant_id, token)

    def close(self) -> None:
        self.keys.forget()
        self.keystore.close()


def seal(aead: AESGCM, merchant_id: str, token: str, pan: Secret[str]) -> tuple[bytes, bytes]:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce, aead.encrypt(nonce, pan.reveal().encode(), aad(merchant_id, token))


def open_sealed(
    aead: AESGCM, merchant_id: str, token: str, nonce: bytes, ciphertext: bytes, dek_id: str
) -> Secret[str]:
    """Decrypts and authenticates; a failed tag is tampering or corruption, never garbage."""
    try:
        if len(nonce) != NONCE_BYTES:
            raise InvalidTag
        return Secret(aead.decrypt(nonce, ciphertext, aad(merchant_id, token)).decode("ascii"))
    except (InvalidTag, UnicodeDecodeError):
        # Alert-level, for the incident channel; identifiers only, never key or card material.
        log.critical("vault.integrity_failure", what="ciphertext", merchant_id=merchant_id, token=token, dek_id=dek_id)
        raise VaultIntegrityError() from None
