"""HTTP routes of the hosted card form (see `strongroom.vault.elements`).

`POST /v1/elements/sessions` is the merchant's (secret key). The other routes are the customer
browser's, inside the iframe: the page and its static files, and the card submission, which is
authorized by the session's client secret alone — never by a merchant key, which must not reach
a browser.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter
from pydantic import StringConstraints
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from strongroom import ratelimit
from strongroom.api import http, openapi, validate
from strongroom.api.body import read_params
from strongroom.api.errors import error_response
from strongroom.auth.models import Principal
from strongroom.errors import StrongroomError
from strongroom.idempotency.service import NULL_RECORDER, Recorder
from strongroom.payments import card_form, methods, views
from strongroom.payments import params as p
from strongroom.payments.schemas import Out
from strongroom.sensitive import Secret
from strongroom.vault import elements

router = APIRouter()
PAGE_PATH = "/v1/elements/card"


class SessionCreate(p.Params):
    allowed_origin: Annotated[str, StringConstraints(min_length=1, max_length=300)]


class SessionOut(Out):
    id: str
    object: Literal["elements_session"]
    client_secret: str
    url: str
    allowed_origin: str
    expires_at: int
    livemode: bool


class CardSubmit(p.Params):
    client_secret: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    card: p.Card
    billing_details: p.BillingDetails | None = None


def _sealer(request: Request) -> elements.SessionSealer:
    # A key of its own, derived from the configured key-hash secret under a distinct label
    # (HMAC as a PRF, as HKDF-Expand does): no new secret to configure, none shared in use.
    hasher = http.services(request).hasher
    return elements.SessionSealer(Secret(hasher.digest(elements.KEY_LABEL)))


@router.post(
    "/v1/elements/sessions", responses=openapi.responses(SessionOut), openapi_extra=openapi.body(SessionCreate)
)
async def create_session(request: Request) -> Response:
    sealer = _sealer(request)
    public_url = http.services(request).payments.public_url

    async def op(principal: Principal, params: SessionCreate, rec: Recorder) -> dict[str, Any]:
        origin = elements.allowed_origin(params.allowed_origin, livemode=principal.livemode)
        session, client_secret = sealer.new(principal.merchant_id, principal.livemode, origin, time.time())
        return {
            "id": session.id,
            "object": "elements_session",
            "client_secret": client_secret,
            "url": f"{public_url}{PAGE_PATH}?session={client_secret}",
            "allowed_origin": session.allowed_origin,
            "expires_at": session.expires_at,
            "livemode": session.livemode,
        }

    async def render(conn: AsyncConnection, principal: Principal, result: dict[str, Any]) -> dict[str, Any]:
        return result

    return await http.post(request, SessionCreate, op, lambda q: render)


@router.get(PAGE_PATH, include_in_schema=False)
async def card_page(request: Request) -> Response:
    try:
        session = _sealer(request).open(request.query_params.get("session", ""))
    except StrongroomError as exc:
        # Nobody is allowed to frame a page for a session that is not ours.
        return _page_error(request, exc, elements.security_headers(None))
    headers = elements.security_headers(session.allowed_origin)
    if session.expired(time.time()):
        return _page_error(request, elements.expired_error(), headers)
    return HTMLResponse(elements.card_page(session), headers=headers)


def _page_error(request: Request, exc: StrongroomError, headers: dict[str, str]) -> Response:
    """A browser (the iframe) is shown the message; any other client gets Stripe's error JSON."""
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(elements.message_page(exc.message), exc.http_status, headers=headers)
    return error_response(exc, headers)


def _static_route(name: str) -> None:
    """The form's script and style, each on its own path (no path parameter that could name another file)."""

    async def handler() -> Response:
        body = elements.static_file(name)
        return Response(body, media_type=elements.STATIC_TYPES[name], headers=elements.security_headers(None))

    router.add_api_route(f"/v1/elements/{name}", handler, methods=["GET"], include_in_schema=False)


for _name in elements.STATIC_TYPES:
    _static_route(_name)


@router.post("/v1/elements/payment_methods", include_in_schema=False)
async def submit_card(request: Request) -> Response:
    """The card from the iframe. No Idempotency-Key: the form sends one request at a time, and
    the session is used up by the payment method it creates."""
    headers = elements.security_headers(None)
    svc = http.services(request)
    limits = svc.settings.ratelimit
    try:
        # PCI DSS 6.4.2 (SECURITY.md P10): before any work, and whether or not the secret is good.
        per_ip = ratelimit.Limit(limits.card_form_per_ip, limits.card_form_per_ip_window_s)
        await ratelimit.check(svc.limiter, f"card_form:ip:{ratelimit.client_ip(request)}", per_ip)
        params = validate.parse(CardSubmit, await read_params(request))
        session = _sealer(request).open(params.client_secret)
        if session.expired(time.time()):
            raise elements.expired_error()
        elements.check_submitter(
            session,
            elements.origin_of(svc.payments.public_url),
            request.headers.get("origin"),
            request.headers.get("referer"),
        )
        per_session = ratelimit.Limit(limits.card_form_per_session, elements.SESSION_TTL_S)
        await ratelimit.check(svc.limiter, f"card_form:session:{session.id}", per_session)
        row = await _create(svc, session, params)
    except ratelimit.Exceeded as exc:
        return error_response(exc, {**headers, **exc.headers()})
    except StrongroomError as exc:
        return error_response(exc, headers)
    return http.json_response(orjson.dumps(views.payment_method(row)), headers=headers)


async def _create(svc: http.Services, session: elements.Session, params: CardSubmit) -> RowMapping:
    principal = Principal(merchant_id=session.merchant_id, livemode=session.livemode, key_id=session.id)
    create = p.PaymentMethodCreate(type="card", card=params.card, billing_details=params.billing_details)
    expires_at = dt.datetime.fromtimestamp(session.expires_at, dt.UTC)
    max_uses = svc.settings.card_form.session_max_uses
    async with svc.db.tx() as conn:
        await card_form.claim_use(conn, session.merchant_id, session.id, expires_at, max_uses)
        return await methods.create(conn, svc.payments.vault, principal, create, NULL_RECORDER)
