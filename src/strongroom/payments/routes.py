"""HTTP routes of payment intents, charges and refunds: parse → authorize → service → render."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from strongroom.api import http, openapi
from strongroom.auth.models import Principal
from strongroom.idempotency.service import Recorder
from strongroom.payments import charges, expand, intents, refunds, schemas, settle, views
from strongroom.payments import params as p
from strongroom.payments.authorize import Finished
from strongroom.payments.context import PaymentsContext
from strongroom.payments.views import Row
from strongroom.store.paging import Page

router = APIRouter()
Viewer = Callable[[AsyncConnection, Principal, RowMapping], Awaitable[dict[str, Any]]]


async def _intent_view(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    return views.payment_intent(row)


async def _refund_view(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    return views.refund(row)


def one(
    kind: str, viewer: Viewer, fields: list[str], offline: Callable[[Row], dict[str, Any]] | None = None
) -> http.Render:
    checked = expand.check(kind, fields)
    if offline is not None and not checked:
        view = offline
        return http.OfflineRender(lambda row: view(row.intent if isinstance(row, Finished) else row))

    async def render(conn: AsyncConnection, principal: Principal, row: Any) -> dict[str, Any]:
        if isinstance(row, Finished):
            row = row.intent
        return await expand.apply(conn, principal, await viewer(conn, principal, row), checked)

    return render


def many(kind: str, viewer: Viewer, url: str, fields: list[str]) -> http.Render:
    checked = expand.check(kind, fields, in_list=True)

    async def render(conn: AsyncConnection, principal: Principal, page: Page) -> dict[str, Any]:
        data = [await expand.apply(conn, principal, await viewer(conn, principal, r), checked) for r in page.rows]
        return {"object": "list", "data": data, "has_more": page.has_more, "url": url}

    return render


def _intent_render(params: Any) -> http.Render:
    """A payment intent; stored with the service's final writes when nothing is expanded."""
    return one("payment_intent", _intent_view, params.expand, views.payment_intent)


def _raise_decline(finished: Finished) -> Finished:
    if finished.error is not None:
        raise finished.error
    return finished


@router.post(
    "/v1/payment_intents",
    responses=openapi.responses(schemas.PaymentIntentOut),
    openapi_extra=openapi.body(p.IntentCreate),
)
async def create_intent(request: Request) -> Response:
    ctx = http.services(request).payments

    async def op(principal: Principal, params: p.IntentCreate, rec: Recorder) -> Finished:
        return _raise_decline(await intents.create(ctx, principal, params, rec))

    # The service writes nothing before its first recorded write (a test alias's payment method
    # excepted: it holds the key first): the key is claimed in the payment's first commit.
    return await http.post(request, p.IntentCreate, op, _intent_render, defer_claim=True)


@router.get(
    "/v1/payment_intents",
    responses=openapi.responses(schemas.PaymentIntentList),
    openapi_extra=openapi.query(p.IntentList),
)
async def list_intents(request: Request) -> Response:
    render = lambda q: many("payment_intent", _intent_view, "/v1/payment_intents", q.expand)  # noqa: E731
    return await http.get(request, p.IntentList, intents.list_intents, render)


@router.get(
    "/v1/payment_intents/{intent_id}",
    responses=openapi.responses(schemas.PaymentIntentOut),
    openapi_extra=openapi.query(p.Retrieve),
)
async def retrieve_intent(request: Request, intent_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await intents.retrieve(conn, principal, intent_id)

    return await http.get(request, p.Retrieve, op, _intent_render)


IntentAction = Callable[[PaymentsContext, Principal, str, Any, Recorder], Awaitable[Finished | RowMapping]]


def _intent_action(suffix: str, model: type[p.Params], action: IntentAction, name: str) -> None:
    """POST /v1/payment_intents/{id}<suffix>: update, confirm, capture and cancel share one shape."""

    async def handler(request: Request, intent_id: str) -> Response:
        ctx = http.services(request).payments

        async def op(principal: Principal, params: Any, rec: Recorder) -> Finished | RowMapping:
            result = await action(ctx, principal, intent_id, params, rec)
            return _raise_decline(result) if isinstance(result, Finished) else result

        return await http.post(request, model, op, _intent_render)

    router.add_api_route(
        f"/v1/payment_intents/{{intent_id}}{suffix}",
        handler,
        methods=["POST"],
        name=name,
        responses=openapi.responses(schemas.PaymentIntentOut),
        openapi_extra=openapi.body(model),
    )


for _suffix, _model, _action, _name in (
    ("", p.IntentUpdate, intents.update, "update_intent"),
    ("/confirm", p.IntentConfirm, intents.confirm, "confirm_intent"),
    ("/capture", p.IntentCapture, settle.capture, "capture_intent"),
    ("/cancel", p.IntentCancel, settle.cancel, "cancel_intent"),
):
    _intent_action(_suffix, _model, _action, _name)


@router.get("/v1/charges", responses=openapi.responses(schemas.ChargeList), openapi_extra=openapi.query(p.ChargeList))
async def list_charges(request: Request) -> Response:
    render = lambda q: many("charge", charges.render, "/v1/charges", q.expand)  # noqa: E731
    return await http.get(request, p.ChargeList, charges.list_charges, render)


@router.get(
    "/v1/charges/{charge_id}", responses=openapi.responses(schemas.ChargeOut), openapi_extra=openapi.query(p.Retrieve)
)
async def retrieve_charge(request: Request, charge_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await charges.retrieve(conn, principal, charge_id)

    return await http.get(request, p.Retrieve, op, lambda q: one("charge", charges.render, q.expand))


@router.post("/v1/refunds", responses=openapi.responses(schemas.RefundOut), openapi_extra=openapi.body(p.RefundCreate))
async def create_refund(request: Request) -> Response:
    ctx = http.services(request).payments

    async def op(principal: Principal, params: p.RefundCreate, rec: Recorder) -> RowMapping:
        return await refunds.create(ctx, principal, params, rec)

    return await http.post(request, p.RefundCreate, op, lambda q: one("refund", _refund_view, q.expand))


@router.get("/v1/refunds", responses=openapi.responses(schemas.RefundList), openapi_extra=openapi.query(p.RefundList))
async def list_refunds(request: Request) -> Response:
    render = lambda q: many("refund", _refund_view, "/v1/refunds", q.expand)  # noqa: E731
    return await http.get(request, p.RefundList, refunds.list_refunds, render)


@router.get(
    "/v1/refunds/{refund_id}", responses=openapi.responses(schemas.RefundOut), openapi_extra=openapi.query(p.Retrieve)
)
async def retrieve_refund(request: Request, refund_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await refunds.retrieve(conn, principal, refund_id)

    return await http.get(request, p.Retrieve, op, lambda q: one("refund", _refund_view, q.expand))


@router.post(
    "/v1/refunds/{refund_id}",
    responses=openapi.responses(schemas.RefundOut),
    openapi_extra=openapi.body(p.RefundUpdate),
)
async def update_refund(request: Request, refund_id: str) -> Response:
    db = http.services(request).db

    async def op(principal: Principal, params: p.RefundUpdate, rec: Recorder) -> RowMapping:
        async with db.tx() as conn:
            return await refunds.update(conn, principal, refund_id, params, rec)

    return await http.post(request, p.RefundUpdate, op, lambda q: one("refund", _refund_view, q.expand))
