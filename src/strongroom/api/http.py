"""The request cycle every route shares: authenticate, read and validate parameters, honour the
Idempotency-Key on POST, call the service, render JSON."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
import structlog
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from strongroom import ratelimit
from strongroom.api import validate
from strongroom.api.auth import authenticate
from strongroom.api.body import read_params
from strongroom.api.errors import error_body, error_response
from strongroom.auth.models import Principal
from strongroom.auth.service import KeyHasher, PrincipalCache
from strongroom.connectors.sandbox import SandboxProcessor
from strongroom.errors import InvalidRequest, StrongroomError
from strongroom.idempotency import service as idempotency
from strongroom.idempotency.service import NULL_RECORDER, Claim, Finish, NotHeld, Recorder, Replay
from strongroom.ids import random_part
from strongroom.payments.context import PaymentsContext
from strongroom.settings import Settings
from strongroom.store.db import Database
from strongroom.vault.relay import CardRelay

M = TypeVar("M", bound=BaseModel)
log = structlog.get_logger(__name__)
Render = Callable[[AsyncConnection, Principal, Any], Awaitable[dict[str, Any]]]
# A renderer is chosen per request from its parameters (e.g. Stripe's `expand[]`).
RenderFor = Callable[[Any], Render]


class OfflineRender:
    """A renderer that reads nothing from the database (no `expand[]`): the response can then be
    stored with the service's own final writes, in the same commit (store.group)."""

    def __init__(self, view: Callable[[Any], dict[str, Any]]) -> None:
        self.view = view

    async def __call__(self, conn: AsyncConnection, principal: Principal, result: Any) -> dict[str, Any]:
        return self.view(result)


@dataclass(frozen=True)
class Services:
    settings: Settings
    db: Database
    hasher: KeyHasher
    payments: PaymentsContext
    # The built-in simulated processor (tests and benchmarks count its charges).
    sandbox: SandboxProcessor
    principals: PrincipalCache
    # The only way card data leaves the vault (closed with the app).
    relay: CardRelay | None = None
    # Rate limits of the public endpoints (SECURITY.md P10); Redis when configured.
    limiter: ratelimit.Limiter = field(default_factory=lambda: ratelimit.MemoryLimiter(100_000))


def services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def json_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers=headers, media_type="application/json")


async def principal_and_params(request: Request, model: type[M]) -> tuple[Principal, M]:
    svc = services(request)
    principal = await authenticate(request, svc.db, svc.hasher, svc.principals)
    params = await read_params(request)
    return principal, validate.parse(model, params)


async def get(
    request: Request,
    model: type[M],
    op: Callable[[AsyncConnection, Principal, M], Awaitable[Any]],
    render_for: RenderFor,
) -> Response:
    principal, params = await principal_and_params(request, model)
    render = render_for(params)
    async with services(request).db.read() as conn:
        result = await op(conn, principal, params)
        body = await render(conn, principal, result)
    return json_response(orjson.dumps(body))


async def delete(
    request: Request,
    model: type[M],
    op: Callable[[AsyncConnection, Principal, M], Awaitable[Any]],
    render_for: RenderFor,
) -> Response:
    principal, params = await principal_and_params(request, model)
    render = render_for(params)
    async with services(request).db.tx() as conn:
        result = await op(conn, principal, params)
        body = await render(conn, principal, result)
    return json_response(orjson.dumps(body))


class _HttpRecorder:
    """Stores the rendered result in the service's final transaction (see idempotency.service)."""

    def __init__(self, claim: Claim, principal: Principal, render: Render, db: Database) -> None:
        self._claim = claim
        self._principal = principal
        self._render = render
        self._db = db

    @property
    def resume_id(self) -> str | None:
        return self._claim.resume_id

    async def hold(self) -> None:
        await self._claim.hold(self._db)

    async def checkpoint(self, conn: AsyncConnection, resource_id: str) -> None:
        await self._claim.checkpoint(conn, resource_id)

    def checkpoint_offline(self, resource_id: str) -> Finish:
        return self._claim.checkpoint_offline(resource_id)

    async def finish(self, conn: AsyncConnection, result: object) -> None:
        if isinstance(result, StrongroomError):
            await self._claim.store(conn, result.http_status, error_body(result))
        else:
            body = orjson.dumps(await self._render(conn, self._principal, result))
            await self._claim.store(conn, 200, body)

    def finish_offline(self, result: object) -> Finish | None:
        if not isinstance(self._render, OfflineRender) or isinstance(result, StrongroomError):
            return None
        body = orjson.dumps(self._render.view(result))
        claim = self._claim
        return Finish([claim.store_write(200, body)], lambda: claim.stored_as(200, body))


async def post(
    request: Request,
    model: type[M],
    op: Callable[[Principal, M, Recorder], Awaitable[Any]],
    render_for: RenderFor,
    *,
    defer_claim: bool = False,
) -> Response:
    """`defer_claim`: the key is written by the service's first recorded write, in its commit,
    not on its own before (idempotency.deferred); only for a service that writes nothing before
    that write (or calls `Recorder.hold` first)."""
    svc = services(request)
    principal = await authenticate(request, svc.db, svc.hasher, svc.principals)
    raw = await read_params(request)
    params = validate.parse(model, raw)
    render = render_for(params)
    key = request.headers.get("idempotency-key")
    if key is None:
        if svc.settings.idempotency.require_key:
            raise InvalidRequest(
                "An Idempotency-Key header is required on this request.", code="idempotency_key_missing"
            )
        return await _run(svc, principal, params, op, render, NULL_RECORDER, None)
    idempotency.validate_key(key, svc.settings.idempotency.key_max_length)
    stored_key = idempotency.scoped(svc.hasher, principal.merchant_id, principal.livemode, key)
    fingerprinted = _without_card_data(raw, svc.hasher)
    path = _path(request)
    if defer_claim:
        pending = idempotency.deferred(principal, stored_key, request.method, path, fingerprinted)
        # NotHeld: the key has a record (or the request was refused): claimed below, then run again.
        with contextlib.suppress(NotHeld):
            return await _run(
                svc, principal, params, op, render, _HttpRecorder(pending, principal, render, svc.db), pending
            )
    claimed = await idempotency.claim(
        svc.db,
        principal,
        stored_key,
        request.method,
        path,
        fingerprinted,
        lock_timeout_s=svc.settings.idempotency.lock_timeout_s,
        ttl_s=svc.settings.idempotency.ttl_s,
    )
    if isinstance(claimed, Replay):
        return json_response(claimed.body, claimed.status, {"Idempotent-Replayed": "true", "Idempotency-Key": key})
    return await _run(svc, principal, params, op, render, _HttpRecorder(claimed, principal, render, svc.db), claimed)


def _path(request: Request) -> str:
    """`request.url.path` (what idempotency records hold) without building the whole URL on every
    POST: the two differ only where the URL escapes `?`, `#` or `\\` in the path."""
    path: str = request.scope["path"]
    return request.url.path if any(c in path for c in "?#\\") else path


_CARD_SECRETS = ("number", "cvc")


def _without_card_data(raw: dict[str, Any], hasher: KeyHasher) -> dict[str, Any]:
    """The parameters the idempotency record is computed from, with the card number and CVC
    replaced by their HMAC under a server-held key. That record is an unkeyed hash kept for a day
    or more; over the raw PAN and CVC it could be reversed by hashing the few values that the
    stored BIN, last 4 and expiry leave (PCI DSS 3.5.1.1, 3.3.1.2). The HMAC still tells a
    different card from the same one, so a reused key with another card is still a mismatch."""
    card = raw.get("card")
    if not isinstance(card, dict):
        return raw
    keyed = {
        name: hasher.digest(f"idempotency/card/{name}/{value}").hex() if name in _CARD_SECRETS else value
        for name, value in card.items()
    }
    return {**raw, "card": keyed}


async def _run(
    svc: Services,
    principal: Principal,
    params: M,
    op: Callable[[Principal, M, Recorder], Awaitable[Any]],
    render: Render,
    rec: Recorder,
    claim: Claim | None,
) -> Response:
    try:
        result = await op(principal, params, rec)
    except StrongroomError as exc:
        if claim is not None and not claim.held:
            # Refused before the key was written: what the key holds (a stored response, another
            # request in flight, other parameters) must be answered first.
            raise NotHeld from exc
        if claim is not None and not claim.stored:
            # Refused before it changed anything: a retry with the same key may run again.
            await claim.release(svc.db)
        return error_response(exc)
    except sa_exc.IntegrityError as exc:
        if claim is not None and not claim.held:
            raise NotHeld from exc  # the deferred INSERT of the key found it taken
        raise
    except sa_exc.TimeoutError:
        return _outcome_unknown(principal)
    if claim is not None and claim.stored:
        # Exactly the bytes a replay will return.
        return json_response(claim.body, claim.status)
    try:
        async with svc.db.tx() as conn:
            body = orjson.dumps(await render(conn, principal, result))
            if claim is not None:
                await claim.store(conn, 200, body)
    except sa_exc.TimeoutError:
        return _outcome_unknown(principal)
    return json_response(body)


def _outcome_unknown(principal: Principal) -> Response:
    """No pooled connection in time once the operation had begun: it may have moved money (the
    processor may have answered), so "not processed, retry" (503) would be a lie that makes a
    retry without an Idempotency-Key charge or refund twice. A 500, which the Stripe SDKs retry
    with the same key; the recovery sweep completes whatever was begun."""
    log.warning("request.outcome_unknown", merchant_id=principal.merchant_id, reason="database_pool_timeout")
    body = {
        "error": {
            "type": "api_error",
            "code": "outcome_unknown",
            "message": (
                "The request was interrupted after it started and may have been processed. Retry it with the "
                "same Idempotency-Key to get its outcome; without one, check its result before retrying."
            ),
        }
    }
    return json_response(orjson.dumps(body), 500)


def request_id() -> str:
    """Each answer's Request-Id: an identifier, from the ids' block of OS randomness."""
    return "req_" + random_part(16)
