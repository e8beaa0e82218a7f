"""Prefixed random identifiers (cus_, pm_, pi_, ch_, re_, evt_, …) like Stripe's.

Ids are 24 characters of base62 after the prefix: ~143 bits from the OS CSPRNG (`os.urandom`,
what `secrets` uses), so they are unguessable and carry no sequence (ARCHITECTURE: no sequential
ids in URLs).

The bytes are drawn from the OS 4 KiB at a time and handed out once each, as OpenSSL's and
BoringSSL's generators draw from theirs: a payment makes about ten ids, and one `getrandom`
system call each was 5% of the server's CPU per payment under load (py-spy). Each chunk of a
block is handed out once, and a forked child drops the chunks it inherited, so no two callers
ever get the same bytes. Secrets (API keys) do not come from here: `secret_part` draws them directly.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import NewType

_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_LENGTH = 24

MerchantId = NewType("MerchantId", str)
CustomerId = NewType("CustomerId", str)
PaymentMethodId = NewType("PaymentMethodId", str)
PaymentIntentId = NewType("PaymentIntentId", str)
ChargeId = NewType("ChargeId", str)
RefundId = NewType("RefundId", str)
EventId = NewType("EventId", str)

PREFIXES = {
    "merchant": "acct_",
    "customer": "cus_",
    "payment_method": "pm_",
    "payment_intent": "pi_",
    "charge": "ch_",
    "refund": "re_",
    "event": "evt_",
    "balance_transaction": "txn_",
    "api_key": "key_",
    "card": "card_",
    "reconciliation": "recon_",
}


# Byte b < 248 (4 x 62) is the character _ALPHABET[b % 62]: exactly uniform; bytes 248 to 255
# are dropped (rejection sampling), 1 in 32.
_TABLE = bytes(ord(_ALPHABET[b % 62]) for b in range(248)) + bytes(256 - 248)
_REJECTED = bytes(range(248, 256))


# What a 24-character part draws (length + 8 bytes: see _base62); blocks are cut into such chunks.
_CHUNK = _LENGTH + 8
_BLOCK_BYTES = 128 * _CHUNK
# Chunks not handed out yet. A deque's append and popleft are atomic, so threads (asyncio's
# to_thread workers) never take the same chunk; two that refill at once just add two blocks.
_chunks: deque[bytes] = deque()

# A forked child must not hand out the chunks its parent will also hand out.
os.register_at_fork(after_in_child=_chunks.clear)


def _draw(n: int) -> bytes:
    """`n` bytes of OS CSPRNG output never handed out before (at most a chunk; more are drawn
    from the OS for this call)."""
    if n > _CHUNK:
        return os.urandom(n)
    try:
        chunk = _chunks.popleft()
    except IndexError:
        block = os.urandom(_BLOCK_BYTES)
        _chunks.extend([block[i : i + _CHUNK] for i in range(_CHUNK, _BLOCK_BYTES, _CHUNK)])
        chunk = block[:_CHUNK]
    return chunk[:n]


def _base62(draw: Callable[[int], bytes], length: int) -> str:
    """`length` base62 characters, each exactly uniform: two C-level translations of the drawn
    bytes (five times cheaper than base62 digits of a big integer)."""
    while True:
        kept = draw(length + 8).translate(None, _REJECTED)
        if len(kept) >= length:  # fewer only if 9 or more of the length + 8 bytes were dropped
            return kept[:length].translate(_TABLE).decode("ascii")


def random_part(length: int = _LENGTH) -> str:
    """`length` base62 characters for an identifier (from the blocks of OS randomness)."""
    return _base62(_draw, length)


def secret_part(length: int) -> str:
    """`length` base62 characters for a secret: drawn from the OS for this call alone, so no
    secret's bytes ever sit in memory before they are needed."""
    return _base62(os.urandom, length)


def new_id(kind: str) -> str:
    return PREFIXES[kind] + random_part()


def has_prefix(value: str, kind: str) -> bool:
    return value.startswith(PREFIXES[kind])
