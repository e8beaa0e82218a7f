"""Stripe's list contract on payment intents, customers and events: newest first, `limit` 1 to 100
(default 10), `starting_after` / `ending_before` cursors with a correct `has_more`, and a `url`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import new_merchant

COUNT = 25


async def _new_intent(api: httpx.AsyncClient) -> str:
    response = await api.post("/v1/payment_intents", data={"amount": "1000", "currency": "usd"})
    assert response.status_code == 200, response.text
    intent_id: str = response.json()["id"]
    return intent_id


async def _new_customer(api: httpx.AsyncClient) -> str:
    response = await api.post("/v1/customers", data={"email": "page@example.com"})
    assert response.status_code == 200, response.text
    customer_id: str = response.json()["id"]
    return customer_id


async def _new_event(api: httpx.AsyncClient) -> str:
    # Each customer creation writes exactly one event.
    customer_id = await _new_customer(api)
    listed = (await api.get("/v1/events", params={"limit": 1})).json()["data"]
    assert listed[0]["data"]["object"]["id"] == customer_id
    event_id: str = listed[0]["id"]
    return event_id


@dataclass(frozen=True)
class Resource:
    url: str
    create: Callable[[httpx.AsyncClient], Awaitable[str]]


RESOURCES = {
    "payment_intents": Resource("/v1/payment_intents", _new_intent),
    "customers": Resource("/v1/customers", _new_customer),
    "events": Resource("/v1/events", _new_event),
}


@dataclass
class Seeded:
    api: httpx.AsyncClient
    url: str
    newest_first: list[str]

    async def page(self, **params: Any) -> dict[str, Any]:
        response = await self.api.get(self.url, params=params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def ids(self, **params: Any) -> tuple[list[str], bool]:
        body = await self.page(**params)
        return [obj["id"] for obj in body["data"]], body["has_more"]


async def _client_for(app: Any, services: Any) -> httpx.AsyncClient:
    merchant = await new_merchant(services, "Pagination merchant")
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers)


@pytest.fixture(scope="module", params=sorted(RESOURCES))
async def seeded(request, app, services) -> AsyncIterator[Seeded]:
    """25 objects of one kind for a merchant of their own (shared by this module's tests, which only read)."""
    resource = RESOURCES[request.param]
    async with await _client_for(app, services) as api:
        created = [await resource.create(api) for _ in range(COUNT)]
        yield Seeded(api, resource.url, list(reversed(created)))


async def test_list_is_newest_first_with_default_limit_10_and_its_url(seeded):
    body = await seeded.page()
    assert body["object"] == "list"
    assert body["url"] == seeded.url
    assert [obj["id"] for obj in body["data"]] == seeded.newest_first[:10]
    assert body["has_more"] is True


@pytest.mark.parametrize(("limit", "has_more"), [(1, True), (24, True), (25, False), (100, False)])
async def test_limit_bounds_the_page_and_has_more_says_whether_more_exist(seeded, limit, has_more):
    ids, more = await seeded.ids(limit=limit)
    assert ids == seeded.newest_first[:limit]
    assert more is has_more


@pytest.mark.parametrize("limit", ["0", "101", "-1", "ten", "1.5"])
async def test_limit_outside_1_to_100_is_400_on_param_limit(seeded, limit):
    response = await seeded.api.get(seeded.url, params={"limit": limit})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "limit"


@pytest.mark.parametrize("limit", [7, 10])
async def test_starting_after_walks_the_whole_list_once(seeded, limit):
    walked: list[str] = []
    pages = []
    cursor: dict[str, str] = {}
    for _ in range(COUNT):  # bounded: at most one page per object
        ids, has_more = await seeded.ids(limit=limit, **cursor)
        walked += ids
        pages.append((len(ids), has_more))
        if not has_more:
            break
        cursor = {"starting_after": ids[-1]}
    assert walked == seeded.newest_first
    full, rest = divmod(COUNT, limit)
    assert pages == [(limit, True)] * (full - (rest == 0)) + [(rest or limit, False)]


@pytest.mark.parametrize("limit", [7, 10])
async def test_ending_before_walks_back_to_the_newest(seeded, limit):
    oldest = seeded.newest_first[-1]
    walked: list[str] = []
    cursor = {"ending_before": oldest}
    for _ in range(COUNT):
        ids, has_more = await seeded.ids(limit=limit, **cursor)
        # Each page is still newest first and holds the objects just newer than the cursor.
        assert ids == seeded.newest_first[seeded.newest_first.index(cursor["ending_before"]) - len(ids) :][: len(ids)]
        walked = ids + walked
        if not has_more:
            break
        cursor = {"ending_before": ids[0]}
    assert walked == seeded.newest_first[:-1]
    assert walked[0] == seeded.newest_first[0]


async def test_starting_after_the_oldest_is_an_empty_last_page(seeded):
    assert await seeded.ids(starting_after=seeded.newest_first[-1]) == ([], False)


async def test_ending_before_the_newest_is_an_empty_page(seeded):
    assert await seeded.ids(ending_before=seeded.newest_first[0]) == ([], False)


async def test_cursor_in_the_middle_returns_the_neighbours(seeded):
    middle = seeded.newest_first[12]
    assert await seeded.ids(starting_after=middle, limit=3) == (seeded.newest_first[13:16], True)
    assert await seeded.ids(ending_before=middle, limit=3) == (seeded.newest_first[9:12], True)


async def test_both_cursors_at_once_are_refused(seeded):
    response = await seeded.api.get(
        seeded.url, params={"starting_after": seeded.newest_first[5], "ending_before": seeded.newest_first[1]}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] in ("starting_after", "ending_before")


@pytest.mark.parametrize("cursor", ["starting_after", "ending_before"])
async def test_another_merchants_id_as_cursor_is_400(seeded, app, services, cursor):
    async with await _client_for(app, services) as other:
        response = await other.get(seeded.url, params={cursor: seeded.newest_first[3]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "resource_missing"
    assert error["param"] == cursor


@pytest.mark.parametrize("cursor", ["starting_after", "ending_before"])
async def test_unknown_cursor_is_400(seeded, cursor):
    response = await seeded.api.get(seeded.url, params={cursor: "xx_doesnotexist"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == cursor


async def test_cursor_must_belong_to_the_listed_kind(seeded):
    # The merchant's objects of another kind are not positions in this list.
    other_url = "/v1/customers" if seeded.url == "/v1/events" else "/v1/events"
    other_id = (await seeded.api.get(other_url, params={"limit": 1})).json()["data"][0]["id"]
    response = await seeded.api.get(seeded.url, params={"starting_after": other_id})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "starting_after"
