"""Customers through the public API: create, retrieve, update (Stripe's metadata merge), delete,
list with the email filter, and the events each change writes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent


async def _customer(api: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    response = await api.post("/v1/customers", data=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    return error


async def _events(api: httpx.AsyncClient, type_: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/events", params={"type": type_, "limit": 100})
    assert response.status_code == 200, response.text
    data: list[dict[str, Any]] = response.json()["data"]
    return data


@pytest.fixture
async def other_api(app: Any, services: Any) -> AsyncIterator[httpx.AsyncClient]:
    other = await new_merchant(services, "Other merchant")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


async def test_create_customer_stores_email_name_and_metadata(api):
    created = await _customer(
        api,
        email="jenny@example.com",
        name="Jenny Rosen",
        description="VIP",
        phone="+15555550100",
        **{"metadata[order_id]": "6735", "metadata[tier]": "gold"},
    )
    assert created["object"] == "customer"
    assert created["id"].startswith("cus_")
    assert created["livemode"] is False
    assert created["email"] == "jenny@example.com"
    assert created["name"] == "Jenny Rosen"
    assert created["description"] == "VIP"
    assert created["phone"] == "+15555550100"
    assert created["metadata"] == {"order_id": "6735", "tier": "gold"}
    assert isinstance(created["created"], int)

    retrieved = await api.get(f"/v1/customers/{created['id']}")
    assert retrieved.status_code == 200
    assert retrieved.json() == created


async def test_create_customer_without_parameters_has_empty_fields(api):
    created = await _customer(api)
    assert created["email"] is None
    assert created["name"] is None
    assert created["metadata"] == {}


async def test_create_customer_accepts_json_body(api):
    response = await api.post("/v1/customers", json={"email": "j@example.com", "metadata": {"k": "v"}})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"k": "v"}


async def test_retrieve_unknown_customer_is_404_resource_missing(api):
    error = _error(await api.get("/v1/customers/cus_doesnotexist"), 404)
    assert error["code"] == "resource_missing"
    assert error["param"] == "id"


async def test_update_merges_metadata_and_an_empty_value_deletes_a_key(api):
    customer = await _customer(api, email="a@example.com", **{"metadata[a]": "1", "metadata[b]": "2"})
    response = await api.post(
        f"/v1/customers/{customer['id']}", data={"metadata[a]": "", "metadata[c]": "3", "name": "New name"}
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert updated["metadata"] == {"b": "2", "c": "3"}
    assert updated["name"] == "New name"
    assert updated["email"] == "a@example.com"  # untouched fields keep their values
    assert (await api.get(f"/v1/customers/{customer['id']}")).json() == updated


async def test_update_with_empty_metadata_string_clears_all_metadata(api):
    customer = await _customer(api, **{"metadata[a]": "1", "metadata[b]": "2"})
    response = await api.post(f"/v1/customers/{customer['id']}", data={"metadata": ""})
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {}


async def test_update_without_metadata_keeps_metadata(api):
    customer = await _customer(api, **{"metadata[a]": "1"})
    response = await api.post(f"/v1/customers/{customer['id']}", data={"email": "new@example.com"})
    assert response.json()["metadata"] == {"a": "1"}
    assert response.json()["email"] == "new@example.com"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({f"metadata[k{i}]": "v" for i in range(51)}, "metadata"),
        ({"metadata[" + "k" * 41 + "]": "v"}, "metadata[" + "k" * 41 + "]"),
        ({"metadata[k]": "v" * 501}, "metadata[k]"),
        ({"bogus": "1"}, "bogus"),
    ],
    ids=["51-keys", "long-key", "long-value", "unknown-parameter"],
)
async def test_invalid_update_is_rejected_and_changes_nothing(api, params, param):
    customer = await _customer(api, **{"metadata[a]": "1"})
    error = _error(await api.post(f"/v1/customers/{customer['id']}", data=params), 400)
    assert error["param"] == param
    assert (await api.get(f"/v1/customers/{customer['id']}")).json() == customer


async def test_delete_customer_answers_deleted_and_hides_it(api):
    customer = await _customer(api, email="gone@example.com")
    response = await api.delete(f"/v1/customers/{customer['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": customer["id"], "object": "customer", "deleted": True}

    retrieved = await api.get(f"/v1/customers/{customer['id']}")
    assert retrieved.status_code == 200
    assert retrieved.json()["deleted"] is True

    listed = (await api.get("/v1/customers", params={"limit": 100})).json()
    assert customer["id"] not in [c["id"] for c in listed["data"]]
    by_email = (await api.get("/v1/customers", params={"email": "gone@example.com"})).json()
    assert by_email["data"] == []


async def test_payment_for_a_deleted_customer_is_404_on_param_customer(api, services, merchant):
    customer = await _customer(api)
    await api.delete(f"/v1/customers/{customer['id']}")
    body = await create_intent(api, expect=404, customer=customer["id"], payment_method="pm_card_visa", confirm=True)
    assert body["error"]["code"] == "resource_missing"
    assert body["error"]["param"] == "customer"
    assert (await api.get("/v1/payment_intents")).json()["data"] == []
    assert await services.sandbox.count_authorizations(merchant.id) == 0


@pytest.mark.parametrize("method", ["POST", "DELETE"])
async def test_a_deleted_customer_can_be_neither_updated_nor_deleted_again(api, method):
    customer = await _customer(api)
    await api.delete(f"/v1/customers/{customer['id']}")
    data = {"name": "x"} if method == "POST" else None
    response = await api.request(method, f"/v1/customers/{customer['id']}", data=data)
    assert _error(response, 404)["code"] == "resource_missing"


async def test_payment_method_cannot_be_attached_to_a_deleted_customer(api):
    customer = await _customer(api)
    await api.delete(f"/v1/customers/{customer['id']}")
    pm = await card_payment_method(api)
    response = await api.post(f"/v1/payment_methods/{pm['id']}/attach", data={"customer": customer["id"]})
    error = _error(response, 404)
    assert error["param"] == "customer"
    assert (await api.get(f"/v1/payment_methods/{pm['id']}")).json()["customer"] is None


async def test_list_filters_by_exact_email_newest_first(api):
    first = await _customer(api, email="shared@example.com")
    await _customer(api, email="other@example.com")
    second = await _customer(api, email="shared@example.com")
    await _customer(api, email="Shared@Example.com")
    listed = (await api.get("/v1/customers", params={"email": "shared@example.com"})).json()
    assert listed["object"] == "list"
    assert listed["url"] == "/v1/customers"
    assert listed["has_more"] is False
    assert [c["id"] for c in listed["data"]] == [second["id"], first["id"]]


async def test_list_shows_only_this_merchants_customers(api, other_api):
    mine = await _customer(api, email="same@example.com")
    theirs = await _customer(other_api, email="same@example.com")
    listed = (await api.get("/v1/customers", params={"email": "same@example.com"})).json()
    assert [c["id"] for c in listed["data"]] == [mine["id"]]
    assert _error(await api.get(f"/v1/customers/{theirs['id']}"), 404)["code"] == "resource_missing"


async def test_customer_changes_write_created_updated_deleted_events(api):
    customer = await _customer(api, email="e@example.com", **{"metadata[a]": "1"})
    await api.post(f"/v1/customers/{customer['id']}", data={"metadata[b]": "2"})
    await api.delete(f"/v1/customers/{customer['id']}")

    created = await _events(api, "customer.created")
    updated = await _events(api, "customer.updated")
    deleted = await _events(api, "customer.deleted")
    assert [len(created), len(updated), len(deleted)] == [1, 1, 1]
    assert created[0]["data"]["object"] == customer  # the snapshot as it was at creation
    assert updated[0]["data"]["object"]["metadata"] == {"a": "1", "b": "2"}
    assert deleted[0]["data"]["object"]["id"] == customer["id"]
    assert deleted[0]["data"]["object"]["deleted"] is True
    assert created[0]["created"] <= updated[0]["created"] <= deleted[0]["created"]


async def test_rejected_customer_requests_write_no_event(api):
    customer = await _customer(api)
    await api.post(f"/v1/customers/{customer['id']}", data={"bogus": "1"})
    await api.post("/v1/customers", data={"email": "x" * 513})
    events = (await api.get("/v1/events", params={"limit": 100})).json()["data"]
    assert [e["type"] for e in events] == ["customer.created"]


async def test_deleting_a_customer_detaches_their_payment_methods(api):
    customer = (await api.post("/v1/customers", data={"email": "gone@example.com"})).json()
    pm = await card_payment_method(api)
    attached = await api.post(f"/v1/payment_methods/{pm['id']}/attach", data={"customer": customer["id"]})
    assert attached.json()["customer"] == customer["id"]
    assert (await api.delete(f"/v1/customers/{customer['id']}")).json()["deleted"] is True
    assert (await api.get(f"/v1/payment_methods/{pm['id']}")).json()["customer"] is None
