"""GET /v1/balance, /v1/balance_transactions and /v1/balance_transactions/{id}."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from strongroom.api import http, openapi
from strongroom.auth.models import Principal
from strongroom.errors import InvalidRequest
from strongroom.ledger import service
from strongroom.payments.params import ListParams, Retrieve
from strongroom.payments.schemas import Out
from strongroom.store.paging import Page, PageRequest

router = APIRouter()


class BalanceAmountOut(Out):
    amount: int
    currency: str


class BalanceOut(Out):
    object: Literal["balance"]
    available: list[BalanceAmountOut]
    pending: list[BalanceAmountOut]
    livemode: bool


class BalanceTransactionOut(Out):
    id: str
    object: Literal["balance_transaction"]
    amount: int
    fee: int
    net: int
    currency: str
    type: str
    source: str
    status: str
    available_on: int
    created: int


class BalanceTransactionListOut(Out):
    object: Literal["list"]
    has_more: bool
    url: str
    data: list[BalanceTransactionOut]


def _no_expand(fields: list[str]) -> None:
    if fields:
        raise InvalidRequest(f"This property cannot be expanded ({fields[0]}).", param="expand")


def _as_is(q: Retrieve) -> http.Render:
    _no_expand(q.expand)

    async def render(conn: AsyncConnection, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        return body

    return render


def _one(q: Retrieve) -> http.Render:
    _no_expand(q.expand)

    async def render(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
        return (await service.balance_transaction_views(conn, principal, [row]))[0]

    return render


def _many(q: ListParams) -> http.Render:
    _no_expand(q.expand)

    async def render(conn: AsyncConnection, principal: Principal, page: Page) -> dict[str, Any]:
        return {
            "object": "list",
            "data": await service.balance_transaction_views(conn, principal, page.rows),
            "has_more": page.has_more,
            "url": "/v1/balance_transactions",
        }

    return render


@router.get("/v1/balance", responses=openapi.responses(BalanceOut), openapi_extra=openapi.query(Retrieve))
async def retrieve_balance(request: Request) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, q: Retrieve) -> dict[str, Any]:
        return await service.balance(conn, principal)

    return await http.get(request, Retrieve, op, _as_is)


@router.get(
    "/v1/balance_transactions",
    responses=openapi.responses(BalanceTransactionListOut),
    openapi_extra=openapi.query(ListParams),
)
async def list_balance_transactions(request: Request) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, q: ListParams) -> Page:
        return await service.list_balance_transactions(
            conn, principal, PageRequest(q.limit, q.starting_after, q.ending_before)
        )

    return await http.get(request, ListParams, op, _many)


@router.get(
    "/v1/balance_transactions/{txn_id}",
    responses=openapi.responses(BalanceTransactionOut),
    openapi_extra=openapi.query(Retrieve),
)
async def retrieve_balance_transaction(request: Request, txn_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, q: Retrieve) -> RowMapping:
        return await service.retrieve_balance_transaction(conn, principal, txn_id)

    return await http.get(request, Retrieve, op, _one)
