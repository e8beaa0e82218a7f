"""Merchants and their secret API keys.

A secret key is shown once, stored only as HMAC-SHA256 under a server-held key (never a plain
hash, so a stolen table cannot be brute-forced offline without that key), and compared in
constant time. `sk_test_` keys act in test mode only: they can never reach a live processor.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import NewMerchant, Principal
from strongroom.auth.tables import api_keys, merchants
from strongroom.errors import AuthenticationFailed
from strongroom.ids import new_id, secret_part
from strongroom.sensitive import Secret
from strongroom.store.db import utcnow

TEST_PREFIX = "sk_test_"
LIVE_PREFIX = "sk_live_"
_SECRET_LENGTH = 48
_MAX_KEY_LENGTH = 128


class KeyHasher:
    def __init__(self, secret: Secret[bytes]) -> None:
        self._secret = secret

    def digest(self, api_key: str) -> bytes:
        return hmac.new(self._secret.reveal(), api_key.encode(), hashlib.sha256).digest()


async def create_merchant(
    conn: AsyncConnection, hasher: KeyHasher, name: str, *, livemode: bool = False
) -> NewMerchant:
    merchant_id = new_id("merchant")
    await conn.execute(merchants.insert().values(id=merchant_id, name=name, created=utcnow()))
    key = await create_api_key(conn, hasher, merchant_id, livemode=livemode)
    return NewMerchant(id=merchant_id, name=name, secret_key=key.reveal())


async def create_api_key(conn: AsyncConnection, hasher: KeyHasher, merchant_id: str, *, livemode: bool) -> Secret[str]:
    secret = (LIVE_PREFIX if livemode else TEST_PREFIX) + secret_part(_SECRET_LENGTH)
    await conn.execute(
        api_keys.insert().values(
            key_hash=hasher.digest(secret),
            id=new_id("api_key"),
            merchant_id=merchant_id,
            livemode=livemode,
            hint=secret[-4:],
            created=utcnow(),
        )
    )
    return Secret(secret)


class PrincipalCache:
    """Recently authenticated keys, so the hot path skips a database round trip per request.

    Bounded in size and age: a revoked key keeps working for at most `ttl_s` on each API process
    (0 disables the cache)."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._items: dict[bytes, tuple[float, Principal]] = {}

    def get(self, digest: bytes) -> Principal | None:
        item = self._items.get(digest)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    def put(self, digest: bytes, principal: Principal) -> None:
        if self._ttl_s <= 0:
            return
        if len(self._items) >= self._max:
            self._items.clear()  # crude but bounded: the next requests repopulate it
        self._items[digest] = (time.monotonic() + self._ttl_s, principal)


def cached_principal(hasher: KeyHasher, presented: str, cache: PrincipalCache) -> Principal | None:
    if not presented.startswith((TEST_PREFIX, LIVE_PREFIX)) or len(presented) > _MAX_KEY_LENGTH:
        return None
    return cache.get(hasher.digest(presented))


async def authenticate(
    conn: AsyncConnection, hasher: KeyHasher, presented: str, cache: PrincipalCache | None = None
) -> Principal:
    if not presented.startswith((TEST_PREFIX, LIVE_PREFIX)) or len(presented) > _MAX_KEY_LENGTH:
        raise AuthenticationFailed()
    digest = hasher.digest(presented)
    row = (
        await conn.execute(
            sa.select(api_keys.c.key_hash, api_keys.c.id, api_keys.c.merchant_id, api_keys.c.livemode).where(
                api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None)
            )
        )
    ).first()
    # The lookup is by digest; the constant-time compare guards against a database collation
    # or driver that ever matched loosely.
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        raise AuthenticationFailed()
    if row.livemode != presented.startswith(LIVE_PREFIX):
        raise AuthenticationFailed()
    principal = Principal(merchant_id=row.merchant_id, livemode=row.livemode, key_id=row.id)
    if cache is not None:
        cache.put(digest, principal)
    return principal


async def merchant_exists(conn: AsyncConnection) -> bool:
    return (await conn.execute(sa.select(merchants.c.id).limit(1))).first() is not None
