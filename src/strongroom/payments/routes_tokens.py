"""HTTP routes of card tokens (Stripe's `POST /v1/tokens`, `GET /v1/tokens/{id}`)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from strongroom.api import http, openapi
from strongroom.auth.models import Principal
from strongroom.idempotency.service import Recorder
from strongroom.payments import methods, tokens
from strongroom.payments import params as p
from strongroom.payments.routes import one
from strongroom.payments.schemas import Out
from strongroom.store.db import utcnow

router = APIRouter()


class TokenCreate(p.Params):
    card: p.Card
    expand: p.Expand = []


class TokenCardOut(Out):
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    funding: str
    fingerprint: str


class TokenOut(Out):
    id: str
    object: Literal["token"]
    type: Literal["card"]
    card: TokenCardOut
    client_ip: str | None
    created: int
    livemode: bool
    used: bool


async def _view(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    return tokens.view(row)


def _render(q: Any) -> http.Render:
    return one("token", _view, q.expand)


@router.post("/v1/tokens", responses=openapi.responses(TokenOut), openapi_extra=openapi.body(TokenCreate))
async def create_token(request: Request) -> Response:
    svc = http.services(request)
    client_ip = request.client.host if request.client is not None else None

    async def op(principal: Principal, params: TokenCreate, rec: Recorder) -> RowMapping:
        number, cvc, year = methods.validate_card(params.card, utcnow().date())
        async with svc.db.tx() as conn:
            facts = await methods.tokenize_card(
                conn, svc.payments.vault, principal.merchant_id, number, cvc, params.card.exp_month, year
            )
            row = await tokens.create(conn, principal, facts, client_ip)
            await rec.finish(conn, row)
            return row

    return await http.post(request, TokenCreate, op, _render)


@router.get("/v1/tokens/{token_id}", responses=openapi.responses(TokenOut), openapi_extra=openapi.query(p.Retrieve))
async def retrieve_token(request: Request, token_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await tokens.retrieve(conn, principal, token_id)

    return await http.get(request, p.Retrieve, op, _render)
