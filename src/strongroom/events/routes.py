"""GET /v1/events and /v1/events/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from strongroom.api import http, openapi
from strongroom.auth.models import Principal
from strongroom.errors import InvalidRequest
from strongroom.events import service
from strongroom.payments import schemas
from strongroom.payments.params import EventList, Retrieve
from strongroom.store.paging import Page, PageRequest

router = APIRouter()


def _no_expand(fields: list[str]) -> None:
    if fields:
        raise InvalidRequest(f"This property cannot be expanded ({fields[0]}).", param="expand")


def _one(q: Retrieve) -> http.Render:
    _no_expand(q.expand)

    async def render(conn: AsyncConnection, principal: Principal, row: RowMapping) -> dict[str, Any]:
        return service.view(row)

    return render


def _many(q: EventList) -> http.Render:
    _no_expand(q.expand)

    async def render(conn: AsyncConnection, principal: Principal, page: Page) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [service.view(r) for r in page.rows],
            "has_more": page.has_more,
            "url": "/v1/events",
        }

    return render


@router.get("/v1/events", responses=openapi.responses(schemas.EventList), openapi_extra=openapi.query(EventList))
async def list_events(request: Request) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, q: EventList) -> Page:
        return await service.list_events(
            conn, principal, PageRequest(q.limit, q.starting_after, q.ending_before), type_=q.type
        )

    return await http.get(request, EventList, op, _many)


@router.get(
    "/v1/events/{event_id}", responses=openapi.responses(schemas.EventOut), openapi_extra=openapi.query(Retrieve)
)
async def retrieve_event(request: Request, event_id: str) -> Response:
    async def op(conn: AsyncConnection, principal: Principal, q: Retrieve) -> RowMapping:
        return await service.retrieve(conn, principal, event_id)

    return await http.get(request, Retrieve, op, _one)
