"""API authentication: `Authorization: Bearer sk_…` (what the SDKs send) or HTTP Basic with the key
as user name (what `curl -u sk_test_…:` sends)."""

from __future__ import annotations

import base64
import binascii

import structlog
from starlette.requests import Request

from strongroom.auth import service as auth_service
from strongroom.auth.models import Principal
from strongroom.errors import AuthenticationFailed
from strongroom.store.db import Database

log = structlog.get_logger(__name__)
# Characters of a presented key kept in the log after its kind (sk_test_, sk_live_): enough to tell
# a mistyped key of one's own from someone trying many, far too few to use.
KEY_PREFIX_CHARS = 4


def presented_key(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise AuthenticationFailed(
            "You did not provide an API key. You need to provide your API key in the Authorization header, "
            "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY')."
        )
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthenticationFailed("Invalid Authorization header.") from None
        return decoded.partition(":")[0]
    raise AuthenticationFailed("Invalid Authorization header: use Bearer auth.")


async def authenticate(
    request: Request, db: Database, hasher: auth_service.KeyHasher, cache: auth_service.PrincipalCache
) -> Principal:
    key: str | None = None
    try:
        key = presented_key(request)
        cached = auth_service.cached_principal(hasher, key, cache)
        if cached is not None:
            return cached
        async with db.read() as conn:
            return await auth_service.authenticate(conn, hasher, key, cache)
    except AuthenticationFailed as exc:
        log_failed_authentication(request, key, exc)
        raise


def key_prefix(presented: str) -> str:
    """What of a presented key may be logged: its kind and KEY_PREFIX_CHARS characters after it."""
    for kind in (auth_service.TEST_PREFIX, auth_service.LIVE_PREFIX):
        if presented.startswith(kind):
            return presented[: len(kind) + KEY_PREFIX_CHARS]
    return presented[:KEY_PREFIX_CHARS]


def log_failed_authentication(
    request: Request, key: str | None, exc: AuthenticationFailed, *, kind: str = "api_key", reason: str = ""
) -> None:
    """PCI DSS 10.2.1.4 (SECURITY.md P18): one event per failed authentication, with the origin
    (10.2.2) and which key was tried, never the key itself."""
    if not reason:
        reason = _reason(request, key)
    log.warning(
        "auth.failed",
        kind=kind,
        reason=reason,
        ip=request.client.host if request.client else None,
        key_prefix=key_prefix(key) if key is not None else None,
        method=request.method,
        path=request.url.path,
        code=exc.code,
    )


def _reason(request: Request, key: str | None) -> str:
    if key is not None:
        return "unknown_key"
    return "malformed_header" if "authorization" in request.headers else "no_key"
