"""HTTP routes of customers and payment methods."""

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
from strongroom.idempotency.service import NO_FINISH, NULL_RECORDER, Finish, Recorder
from strongroom.payments import customers, methods, schemas, views
from strongroom.payments import params as p
from strongroom.payments.routes import many, one

router = APIRouter()


async def _customer_view(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    return views.customer(row)


async def _pm_view(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
    return views.payment_method(row)


def _customer(q: Any) -> http.Render:
    return one("customer", _customer_view, q.expand)


def _pm(q: Any) -> http.Render:
    return one("payment_method", _pm_view, q.expand)


@router.post(
    "/v1/customers", responses=openapi.responses(schemas.CustomerOut), openapi_extra=openapi.body(p.CustomerCreate)
)
async def create_customer(request: Request) -> Response:
    svc = http.services(request)

    async def op(principal: Principal, params: p.CustomerCreate, rec: Recorder) -> RowMapping:
        async with svc.db.tx() as conn:
            row = await customers.create(conn, principal, params, _Deferred(rec))
            if params.payment_method is not None:
                attach = p.PaymentMethodAttach(customer=row["id"])
                await methods.attach(
                    conn, principal, params.payment_method, attach, _Deferred(rec), pm_param="payment_method"
                )
            await rec.finish(conn, row)
            return row

    return await http.post(request, p.CustomerCreate, op, _customer)


class _Deferred:
    """Runs several service calls in one transaction and records only the last result."""

    def __init__(self, rec: Recorder) -> None:
        self.resume_id = rec.resume_id
        self._rec = rec

    async def hold(self) -> None:
        await self._rec.hold()

    async def checkpoint(self, conn: AsyncConnection, resource_id: str) -> None:
        return None

    def checkpoint_offline(self, resource_id: str) -> Finish:
        return NO_FINISH

    async def finish(self, conn: AsyncConnection, result: object) -> None:
        return None

    def finish_offline(self, result: object) -> Finish | None:
        return NO_FINISH


@router.get(
    "/v1/customers", responses=openapi.responses(schemas.CustomerList), openapi_extra=openapi.query(p.CustomerList)
)
async def list_customers(request: Request) -> Response:
    return await http.get(
        request,
        p.CustomerList,
        customers.list_customers,
        lambda q: many("customer", _customer_view, "/v1/customers", q.expand),
    )


@router.get(
    "/v1/customers/{customer_id}",
    responses=openapi.responses(schemas.CustomerOut),
    openapi_extra=openapi.query(p.Retrieve),
)
async def retrieve_customer(request: Request, customer_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await customers.retrieve(conn, principal, customer_id)

    return await http.get(request, p.Retrieve, op, _customer)


@router.post(
    "/v1/customers/{customer_id}",
    responses=openapi.responses(schemas.CustomerOut),
    openapi_extra=openapi.body(p.CustomerUpdate),
)
async def update_customer(request: Request, customer_id: str) -> Response:
    db = http.services(request).db

    async def op(principal: Principal, params: p.CustomerUpdate, rec: Recorder) -> RowMapping:
        async with db.tx() as conn:
            return await customers.update(conn, principal, customer_id, params, rec)

    return await http.post(request, p.CustomerUpdate, op, _customer)


@router.delete("/v1/customers/{customer_id}", responses=openapi.responses(schemas.CustomerOut))
async def delete_customer(request: Request, customer_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await customers.delete(conn, principal, customer_id, NULL_RECORDER)

    return await http.delete(request, p.Retrieve, op, _customer)


@router.get(
    "/v1/customers/{customer_id}/payment_methods",
    responses=openapi.responses(schemas.PaymentMethodList),
    openapi_extra=openapi.query(p.PaymentMethodList),
)
async def list_customer_methods(request: Request, customer_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.PaymentMethodList) -> Any:
        return await methods.list_methods(conn, principal, params.model_copy(update={"customer": customer_id}))

    url = f"/v1/customers/{customer_id}/payment_methods"
    return await http.get(request, p.PaymentMethodList, op, lambda q: many("payment_method", _pm_view, url, q.expand))


@router.post(
    "/v1/payment_methods",
    responses=openapi.responses(schemas.PaymentMethodOut),
    openapi_extra=openapi.body(p.PaymentMethodCreate),
)
async def create_payment_method(request: Request) -> Response:
    svc = http.services(request)

    async def op(principal: Principal, params: p.PaymentMethodCreate, rec: Recorder) -> RowMapping:
        async with svc.db.tx() as conn:
            return await methods.create(conn, svc.payments.vault, principal, params, rec)

    return await http.post(request, p.PaymentMethodCreate, op, _pm)


@router.get(
    "/v1/payment_methods",
    responses=openapi.responses(schemas.PaymentMethodList),
    openapi_extra=openapi.query(p.PaymentMethodList),
)
async def list_payment_methods(request: Request) -> Response:
    return await http.get(
        request,
        p.PaymentMethodList,
        methods.list_methods,
        lambda q: many("payment_method", _pm_view, "/v1/payment_methods", q.expand),
    )


@router.get(
    "/v1/payment_methods/{pm_id}",
    responses=openapi.responses(schemas.PaymentMethodOut),
    openapi_extra=openapi.query(p.Retrieve),
)
async def retrieve_payment_method(request: Request, pm_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, params: p.Retrieve) -> RowMapping:
        return await methods.retrieve(conn, principal, pm_id)

    return await http.get(request, p.Retrieve, op, _pm)


MethodAction = Callable[[AsyncConnection, Principal, str, Any, Recorder], Awaitable[RowMapping]]


async def _detach(conn: AsyncConnection, principal: Principal, pm_id: str, params: Any, rec: Recorder) -> RowMapping:
    return await methods.detach(conn, principal, pm_id, rec)


def _method_action(suffix: str, model: type[p.Params], action: MethodAction, name: str) -> None:
    """POST /v1/payment_methods/{id}<suffix>: update, attach and detach share one shape."""

    async def handler(request: Request, pm_id: str) -> Response:
        db = http.services(request).db

        async def op(principal: Principal, params: Any, rec: Recorder) -> RowMapping:
            async with db.tx() as conn:
                return await action(conn, principal, pm_id, params, rec)

        return await http.post(request, model, op, _pm)

    router.add_api_route(
        f"/v1/payment_methods/{{pm_id}}{suffix}",
        handler,
        methods=["POST"],
        name=name,
        responses=openapi.responses(schemas.PaymentMethodOut),
        openapi_extra=openapi.body(model),
    )


for _suffix, _model, _action, _name in (
    ("", p.PaymentMethodUpdate, methods.update, "update_payment_method"),
    ("/attach", p.PaymentMethodAttach, methods.attach, "attach_payment_method"),
    ("/detach", p.PaymentMethodDetach, _detach, "detach_payment_method"),
):
    _method_action(_suffix, _model, _action, _name)
