"""Tokenization: the narrow interface through which the payments domain stores a card.

The payments domain hands a PAN in (as a `Secret`) and gets back a random token, the card's
non-sensitive facts and a keyed fingerprint. It never gets the PAN back: processors are reached
through connectors that hold only `CardRef`s.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.sensitive import Secret
from strongroom.store.db import utcnow
from strongroom.vault.keystore import Keystore
from strongroom.vault.tables import vault_cards

NONCE_BYTES = 12  # NIST SP 800-38D: 96-bit random nonces


@dataclass(frozen=True)
class StoredCard:
    token: str
    fingerprint: str


def _aad(merchant_id: str, token: str) -> bytes:
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


class Vault:
    def __init__(self, keystore: Keystore, cvc_cache: CvcCache) -> None:
        self._keys = keystore
        self.cvcs = cvc_cache

    def fingerprint(self, merchant_id: str, pan: Secret[str]) -> str:
        digest = hmac.new(self._keys.fingerprint_key(merchant_id), pan.reveal().encode(), hashlib.sha256).hexdigest()
        return digest[:16]

    async def tokenize(
        self, conn: AsyncConnection, merchant_id: str, pan: Secret[str], cvc: Secret[str] | None
    ) -> StoredCard:
        token = "card_" + secrets.token_urlsafe(24)
        version = self._keys.key_version
        nonce = secrets.token_bytes(NONCE_BYTES)
        ciphertext = AESGCM(self._keys.encryption_key(version)).encrypt(
            nonce, pan.reveal().encode(), _aad(merchant_id, token)
        )
        await conn.execute(
            vault_cards.insert().values(
                merchant_id=merchant_id,
                token=token,
                key_version=version,
                nonce=nonce,
                ciphertext=ciphertext,
                created=utcnow(),
            )
        )
        if cvc is not None:
            self.cvcs.put(merchant_id, token, cvc)
        return StoredCard(token=token, fingerprint=self.fingerprint(merchant_id, pan))

    def discard_cvc(self, merchant_id: str, token: str) -> None:
        """Called after the first authorization attempt: the CVC must not outlive it."""
        self.cvcs.take(merchant_id, token)
