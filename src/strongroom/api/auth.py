"""API authentication: `Authorization: Bearer sk_…` (what the SDKs send) or HTTP Basic with the key
as user name (what `curl -u sk_test_…:` sends)."""

from __future__ import annotations

import base64
import binascii

from starlette.requests import Request

from strongroom.auth import service as auth_service
from strongroom.auth.models import Principal
from strongroom.errors import AuthenticationFailed
from strongroom.store.db import Database


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
    key = presented_key(request)
    cached = auth_service.cached_principal(hasher, key, cache)
    if cached is not None:
        return cached
    async with db.read() as conn:
        return await auth_service.authenticate(conn, hasher, key, cache)
