"""The authenticated channel between the api and a vault running as its own process.

Every internal request carries a signed service token in the `Strongroom-Signature` header:

    Strongroom-Signature: t=<unix seconds>,n=<random nonce>,v1=<hex HMAC-SHA256>

over `t.n.METHOD.path.` followed by the exact body bytes, keyed by the shared service secret
(`STRONGROOM_VAULT__SERVICE_SECRET`, at least 32 bytes, from configuration). The vault accepts a
signature only if it verifies (constant-time comparison), its time is within `tolerance_s` of its
own clock, and its nonce has not been seen within twice that window: a captured request cannot
be replayed, altered, or sent to another path. Over TLS (`strongroom vault serve --tls-cert
--tls-key`, optionally requiring client certificates) this gives the mutually authenticated,
encrypted channel PCI DSS 4.2.1 asks for between the zones.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict

from strongroom.sensitive import Secret

HEADER = "strongroom-signature"
MIN_SECRET_BYTES = 32


class ChannelError(Exception):
    """The request is not from the api (bad, stale or replayed signature). The message is safe to
    log and return: it never contains the signature or the secret."""


def _mac(secret: Secret[bytes], timestamp: int, nonce: str, method: str, path: str, body: bytes) -> str:
    message = f"{timestamp}.{nonce}.{method.upper()}.{path}.".encode() + body
    return hmac.new(secret.reveal(), message, hashlib.sha256).hexdigest()


def check_secret(secret: Secret[bytes]) -> Secret[bytes]:
    if len(secret.reveal()) < MIN_SECRET_BYTES:
        raise ValueError(f"the vault service secret must be at least {MIN_SECRET_BYTES} bytes")
    return secret


def sign(secret: Secret[bytes], method: str, path: str, body: bytes, *, now: float | None = None) -> str:
    timestamp = int(now if now is not None else time.time())
    nonce = secrets.token_urlsafe(16)
    return f"t={timestamp},n={nonce},v1={_mac(secret, timestamp, nonce, method, path, body)}"


class Verifier:
    def __init__(self, secret: Secret[bytes], *, tolerance_s: float = 60.0, max_nonces: int = 1_000_000) -> None:
        self._secret = check_secret(secret)
        self._tolerance_s = tolerance_s
        self._max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()

    def verify(self, header: str | None, method: str, path: str, body: bytes, *, now: float | None = None) -> None:
        if not header:
            raise ChannelError("missing service signature")
        try:
            fields = dict(part.split("=", 1) for part in header.split(","))
            timestamp, nonce, given = int(fields["t"]), fields["n"], fields["v1"]
        except (ValueError, KeyError):
            raise ChannelError("malformed service signature") from None
        current = now if now is not None else time.time()
        if abs(current - timestamp) > self._tolerance_s:
            raise ChannelError("stale service signature")
        expected = _mac(self._secret, timestamp, nonce, method, path, body)
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise ChannelError("invalid service signature")
        self._forget_before(current - 2 * self._tolerance_s)
        if nonce in self._seen:
            raise ChannelError("replayed service signature")
        self._seen[nonce] = current
        while len(self._seen) > self._max_nonces:
            self._seen.popitem(last=False)

    def _forget_before(self, cutoff: float) -> None:
        while self._seen:
            nonce, seen_at = next(iter(self._seen.items()))
            if seen_at >= cutoff:
                return
            del self._seen[nonce]
