"""The API's error contract and authentication: Stripe's error shape and HTTP codes for every kind
of bad request, never a 5xx, secret keys (Bearer and Basic, stored only as HMAC), and live keys
kept apart from test mode and refused money movement while no live processor is configured."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.routing import iter_route_contexts
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent

from strongroom.api.body import MAX_BODY_BYTES
from strongroom.auth.service import create_api_key
from strongroom.auth.tables import api_keys

ERROR_TYPES = {"api_error", "card_error", "idempotency_error", "invalid_request_error", "rate_limit_error"}
ERROR_FIELDS = {"type", "code", "decline_code", "param", "message", "doc_url", "charge", "payment_intent"}


def stripe_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """Asserts Stripe's error shape: a JSON object under "error" with a type and a message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] in ERROR_TYPES
    assert isinstance(error["message"], str)
    assert error["message"]
    assert set(error) <= ERROR_FIELDS
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def _client(app: Any, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", headers=headers)


@pytest.fixture
async def live_key(services, merchant) -> str:
    async with services.db.tx() as conn:
        key = await create_api_key(conn, services.hasher, merchant.id, livemode=True)
    return key.reveal()


@pytest.fixture
async def live_api(app, live_key) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(app, live_key) as client:
        yield client


# --- authentication ---------------------------------------------------------------------------


async def test_request_without_authorization_is_401_invalid_request_error(anonymous):
    response = await anonymous.get("/v1/customers")
    stripe_error(response, 401)
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize(
    "header",
    [
        "Bearer sk_test_" + "A" * 48,
        "Bearer sk_live_" + "A" * 48,
        "Bearer pk_test_123",
        "Bearer ",
        "Token sk_test_abc",
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"sk_test_wrong:").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:").decode(),
        "sk_test_abc",
    ],
    ids=[
        "unknown-test-key",
        "unknown-live-key",
        "publishable",
        "empty",
        "scheme",
        "bad-b64",
        "basic-wrong",
        "utf8",
        "bare",
    ],
)
async def test_wrong_or_malformed_key_is_401(anonymous, header):
    stripe_error(await anonymous.get("/v1/customers", headers={"Authorization": header}), 401)


async def test_key_is_checked_before_the_body_is_read(anonymous):
    response = await anonymous.post(
        "/v1/payment_intents", content=b"{not json", headers={"content-type": "application/json"}
    )
    stripe_error(response, 401)


async def test_basic_auth_with_the_key_as_user_name_works_like_curl_u(app, merchant, api):
    customer = (await api.post("/v1/customers", data={"email": "basic@example.com"})).json()
    async with _client(app, None) as client:
        response = await client.get(f"/v1/customers/{customer['id']}", auth=(merchant.secret_key, ""))
    assert response.status_code == 200, response.text
    assert response.json()["email"] == "basic@example.com"


async def test_api_keys_are_stored_only_as_hmac(services, merchant, live_key):
    async with services.db.read() as conn:
        rows = (await conn.execute(sa.select(api_keys).where(api_keys.c.merchant_id == merchant.id))).mappings().all()
    assert len(rows) == 2
    stored = {bytes(row["key_hash"]): row for row in rows}
    for secret in (merchant.secret_key, live_key):
        digest = services.hasher.digest(secret)
        assert digest in stored, "the key is found by its HMAC"
        row = stored[digest]
        assert row["hint"] == secret[-4:]
        assert digest != hashlib.sha256(secret.encode()).digest(), "a plain hash could be attacked offline"
        for value in row.values():
            text = value if isinstance(value, str) else bytes(value).hex() if isinstance(value, bytes) else str(value)
            assert secret not in text
            assert secret.encode() not in (value if isinstance(value, bytes) else b"")
            assert secret[8:20] not in text  # no fragment of the random part beyond the hint


# --- malformed requests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"amount"', "application/json"),
        (b"\xff\xfe", "application/json"),
        (b"amount=1%zz", "application/x-www-form-urlencoded"),
        (b"amount=1&amount=2", "application/x-www-form-urlencoded"),
        (b"<amount>1</amount>", "text/xml"),
    ],
    ids=["broken-json", "json-array", "json-string", "bad-utf8", "bad-percent", "duplicate", "xml"],
)
async def test_malformed_body_is_400(api, content, content_type):
    response = await api.post("/v1/payment_intents", content=content, headers={"content-type": content_type})
    stripe_error(response, 400)
    assert (await api.get("/v1/payment_intents")).json()["data"] == []


async def test_body_over_256_kib_is_413_with_stripe_error_shape(api):
    body = b"description=" + b"x" * MAX_BODY_BYTES
    response = await api.post(
        "/v1/payment_intents", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    stripe_error(response, 413, code="payload_too_large")


async def test_streamed_body_over_256_kib_without_content_length_is_413(api):
    async def chunks() -> AsyncIterator[bytes]:
        yield b"description="
        for _ in range(MAX_BODY_BYTES // 4096 + 1):
            yield b"x" * 4096

    response = await api.post(
        "/v1/payment_intents", content=chunks(), headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert "content-length" not in response.request.headers
    stripe_error(response, 413, code="payload_too_large")


async def test_body_of_exactly_256_kib_is_read_and_validated(api):
    prefix = b"amount=100&currency=usd&description="
    body = prefix + b"x" * (MAX_BODY_BYTES - len(prefix))
    assert len(body) == MAX_BODY_BYTES
    response = await api.post(
        "/v1/payment_intents", content=body, headers={"content-type": "application/x-www-form-urlencoded"}
    )
    stripe_error(response, 400, param="description")


async def test_unknown_route_is_404_json(api):
    stripe_error(await api.get("/v1/no_such_resource"), 404, code="resource_missing")


async def test_unknown_route_without_a_key_is_still_json(anonymous):
    stripe_error(await anonymous.post("/v2/anything"), 404)


async def test_wrong_method_is_405_json(api):
    stripe_error(await api.delete("/v1/payment_intents/pi_123"), 405)


# (method, path, params, param named in the error)
UNKNOWN_PARAMETERS = [
    ("POST", "/v1/payment_intents", {"amount": "100", "currency": "usd", "bogus": "1"}, "bogus"),
    ("POST", "/v1/customers", {"emial": "typo@example.com"}, "emial"),
    (
        "POST",
        "/v1/payment_methods",
        {
            "type": "card",
            "card[number]": "4242424242424242",
            "card[exp_month]": "1",
            "card[exp_year]": "2034",
            "card[bogus]": "1",
        },
        "card[bogus]",
    ),
    ("POST", "/v1/customers", {"metadata[ok]": "1", "address[line1]": "x"}, "address"),
    ("GET", "/v1/customers", {"bogus": "1"}, "bogus"),
    ("GET", "/v1/payment_intents", {"limit": "1", "expand[0]": "data.customer", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "param"), UNKNOWN_PARAMETERS, ids=[c[3] for c in UNKNOWN_PARAMETERS]
)
async def test_unknown_parameter_is_400_naming_it(api, method, path, params, param):
    if method == "GET":
        response = await api.get(path, params=params)
    else:
        response = await api.post(path, data=params)
    error = stripe_error(response, 400, code="parameter_unknown", param=param)
    assert param in error["message"]
    assert (await api.get("/v1/events")).json()["data"] == []


MISSING = [
    ("/v1/payment_intents", {"currency": "usd"}, "amount"),
    ("/v1/payment_intents", {"amount": "100"}, "currency"),
    ("/v1/payment_methods", {"type": "card", "card[exp_month]": "1", "card[exp_year]": "2034"}, "card[number]"),
    ("/v1/payment_methods", {"card[number]": "4242424242424242"}, "type"),
]


@pytest.mark.parametrize(("path", "params", "param"), MISSING, ids=[f"{c[0]}-{c[2]}" for c in MISSING])
async def test_missing_required_parameter_is_400_parameter_missing(api, path, params, param):
    stripe_error(await api.post(path, data=params), 400, code="parameter_missing", param=param)


async def test_attach_without_customer_is_parameter_missing(api):
    pm = await card_payment_method(api)
    stripe_error(await api.post(f"/v1/payment_methods/{pm['id']}/attach"), 400, "parameter_missing", "customer")


WRONG_TYPES = [
    ("POST", "/v1/payment_intents", {"amount": "abc", "currency": "usd"}, "amount"),
    ("POST", "/v1/payment_intents", {"amount": "12.5", "currency": "usd"}, "amount"),
    ("POST", "/v1/payment_intents", {"amount": "100", "currency": "usd", "confirm": "maybe"}, "confirm"),
    ("POST", "/v1/payment_intents", {"amount": "100", "currency": "usd", "metadata": "x"}, "metadata"),
    ("POST", "/v1/payment_intents", {"amount": "100", "currency": "usd", "capture_method": "later"}, "capture_method"),
    ("POST", "/v1/payment_intents", {"amount": "100", "currency": "zzz"}, "currency"),
    (
        "POST",
        "/v1/payment_methods",
        {"type": "card", "card[number]": "4242424242424242", "card[exp_month]": "xx", "card[exp_year]": "2034"},
        "card[exp_month]",
    ),
    ("POST", "/v1/payment_methods", {"type": "sepa_debit", "card[number]": "1"}, "type"),
    ("GET", "/v1/customers", {"limit": "ten"}, "limit"),
    ("GET", "/v1/customers", {"starting_after": "not an id!"}, "starting_after"),
]


@pytest.mark.parametrize(
    ("method", "path", "params", "param"), WRONG_TYPES, ids=[f"{c[1]}-{c[3]}-{i}" for i, c in enumerate(WRONG_TYPES)]
)
async def test_wrong_type_is_400_naming_the_parameter(api, method, path, params, param):
    response = await (api.get(path, params=params) if method == "GET" else api.post(path, data=params))
    error = stripe_error(response, 400, param=param)
    assert error["code"] in {"parameter_invalid", "parameter_invalid_integer"}


async def test_wrong_type_in_json_body_is_400(api):
    response = await api.post("/v1/payment_intents", json={"amount": True, "currency": "usd"})
    stripe_error(response, 400, code="parameter_invalid_integer", param="amount")
    response = await api.post("/v1/payment_intents", json={"amount": 100, "currency": "usd", "metadata": {"a": 1}})
    stripe_error(response, 400, code="parameter_invalid", param="metadata[a]")


async def test_query_parameters_on_post_are_refused(api):
    response = await api.post("/v1/customers?email=x@example.com", data={"name": "x"})
    stripe_error(response, 400, param="email")
    assert (await api.get("/v1/customers")).json()["data"] == []


async def test_missing_object_is_404_resource_missing_with_param_id(api):
    stripe_error(await api.get("/v1/payment_intents/pi_missing"), 404, code="resource_missing", param="id")


async def test_reference_to_missing_object_is_404_naming_the_parameter(api):
    body = await create_intent(api, expect=404, customer="cus_missing")
    assert body["error"]["param"] == "customer"
    body = await create_intent(api, expect=404, payment_method="pm_missing")
    assert body["error"]["param"] == "payment_method"


async def test_declined_card_is_402_card_error_with_decline_code(api):
    body = await create_intent(api, expect=402, payment_method="pm_card_chargeDeclinedInsufficientFunds", confirm=True)
    assert body["error"]["type"] == "card_error"
    assert body["error"]["code"] == "card_declined"
    assert body["error"]["decline_code"] == "insufficient_funds"
    assert body["error"]["message"]


# --- no 5xx, whatever arrives -----------------------------------------------------------------

HOSTILE_QUERIES = [
    "bogus=1",
    "limit=100000000000000000000000000",
    "a%zz=1",
    "a[b][c][d][e][f][g]=1",
    "a=1&a=2",
    "starting_after=%00",
    "%ff=1",
    "expand[]=data.nothing",
    "expand[0][x]=1",
    "email[]=x",
    "created[gt]=x",
]
HOSTILE_BODIES = [
    (b"[]", "application/json"),
    (b"null", "application/json"),
    (b"{", "application/json"),
    (b'{"amount": 1e400, "currency": "usd"}', "application/json"),
    (b'{"amount": 123456789012345678901234567890, "currency": "usd"}', "application/json"),
    (b"[" * 5000 + b"]" * 5000, "application/json"),
    (b'{"metadata": {"a": null}, "customer": 5}', "application/json"),
    (b"amount=-1&currency=usd", "application/x-www-form-urlencoded"),
    (b"metadata[a]=%ff", "application/x-www-form-urlencoded"),
    (b"expand[]=bogus", "application/x-www-form-urlencoded"),
    (b"customer=cus_%00&payment_method=pm_%00&charge=ch_x&payment_intent=pi_x", "application/x-www-form-urlencoded"),
    # Non-ASCII secrets: `token=été` on the 3-D Secure completion was a 500 (hmac.compare_digest).
    (b"token=%C3%A9t%C3%A9&result=succeeded", "application/x-www-form-urlencoded"),
    ('{"token": "été", "result": "failed", "client_secret": "été"}'.encode(), "application/json"),
    (
        b"client_secret=%C3%A9t%C3%A9&card[number]=4242424242424242&card[exp_month]=1",
        "application/x-www-form-urlencoded",
    ),
]
HOSTILE_IDS = ["x", "%00", "%ff", "a" * 300, "pi_x%2F.."]


def _all_routes(app: Any) -> list[tuple[str, str]]:
    """Every route the app serves, documented in /openapi.json or not (card form, 3-D Secure,
    sandbox, operational endpoints), so that a new one cannot escape this test."""
    return sorted(
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        for method in (getattr(route, "methods", None) or set()) - {"HEAD"}
    )


async def _real_ids(api: httpx.AsyncClient, merchant: Any) -> dict[str, str]:
    """Real objects of the merchant for the path parameters that reach logic behind a lookup
    (the 3-D Secure completion compares its token only for an intent awaiting authentication)."""
    pm = await card_payment_method(api, "4000002500003155")
    intent = await create_intent(api, payment_method=pm["id"], confirm=True)
    return {"merchant_id": merchant.id, "intent_id": intent["id"], "pm_id": pm["id"]}


def _fill(template: str, ids: dict[str, str]) -> str:
    return re.sub(r"\{([^}]+)\}", lambda m: ids.get(m.group(1), "x"), template)


async def test_pci_6_2_4_no_5xx_for_hostile_input_on_any_route(app, api, merchant):
    routes = _all_routes(app)
    assert len(routes) >= 40
    assert {("POST", "/v1/sandbox/3ds/{merchant_id}/{intent_id}"), ("POST", "/v1/elements/payment_methods")} <= set(
        routes
    )
    for method, template in routes:
        filled = [re.sub(r"\{[^}]+\}", ident, template) for ident in HOSTILE_IDS]
        if "{" in template:
            # Fresh objects per route: an earlier route's hostile body may have moved them on.
            real = await _real_ids(api, merchant)
            filled.append(_fill(template, real))
        for path in filled:
            if method in ("GET", "DELETE"):
                requests = [api.build_request(method, f"{path}?{query}") for query in HOSTILE_QUERIES]
            else:
                requests = [
                    api.build_request(method, path, content=body, headers={"content-type": content_type})
                    for body, content_type in HOSTILE_BODIES
                ]
            for request in requests:
                response = await api.send(request)
                assert response.status_code < 500, (method, request.url, request.content[:80], response.text)
                if response.status_code >= 400:
                    stripe_error(response, response.status_code)


# --- live keys --------------------------------------------------------------------------------


async def test_live_key_payment_is_refused_403_and_the_processor_records_nothing(live_api, services, merchant):
    pm = await card_payment_method(live_api)
    assert pm["livemode"] is True
    before = await services.sandbox.count_authorizations(merchant.id)
    response = await live_api.post(
        "/v1/payment_intents",
        data={"amount": "2000", "currency": "usd", "payment_method": pm["id"], "confirm": "true"},
    )
    stripe_error(response, 403, code="livemode_not_enabled")
    assert await services.sandbox.count_authorizations(merchant.id) == before == 0
    assert (await live_api.get("/v1/payment_intents")).json()["data"] == []
    assert [e["type"] for e in (await live_api.get("/v1/events")).json()["data"]] == []


async def test_live_key_cannot_use_test_mode_card_aliases(live_api, services, merchant):
    body = await create_intent(live_api, expect=404, payment_method="pm_card_visa", confirm=True)
    assert body["error"]["param"] == "payment_method"
    assert await services.sandbox.count_authorizations(merchant.id) == 0


async def test_live_and_test_objects_are_separate(api, live_api):
    test_customer = (await api.post("/v1/customers", data={"email": "test@example.com"})).json()
    live_customer = (await live_api.post("/v1/customers", data={"email": "live@example.com"})).json()
    assert test_customer["livemode"] is False
    assert live_customer["livemode"] is True

    stripe_error(await live_api.get(f"/v1/customers/{test_customer['id']}"), 404, code="resource_missing")
    stripe_error(await api.get(f"/v1/customers/{live_customer['id']}"), 404, code="resource_missing")
    stripe_error(await live_api.post(f"/v1/customers/{test_customer['id']}", data={"name": "x"}), 404)
    stripe_error(await live_api.delete(f"/v1/customers/{test_customer['id']}"), 404)

    assert [c["id"] for c in (await api.get("/v1/customers")).json()["data"]] == [test_customer["id"]]
    assert [c["id"] for c in (await live_api.get("/v1/customers")).json()["data"]] == [live_customer["id"]]
    live_events = (await live_api.get("/v1/events")).json()["data"]
    assert [(e["type"], e["livemode"]) for e in live_events] == [("customer.created", True)]
    assert (await api.get(f"/v1/customers/{test_customer['id']}")).json() == test_customer


async def test_test_payment_and_live_payment_method_do_not_mix(api, live_api, services, merchant):
    live_pm = await card_payment_method(live_api)
    body = await create_intent(api, expect=404, payment_method=live_pm["id"], confirm=True)
    assert body["error"]["param"] == "payment_method"
    assert await services.sandbox.count_authorizations(merchant.id) == 0


async def test_other_merchants_key_sees_none_of_this_merchants_objects(app, services, api):
    customer = (await api.post("/v1/customers")).json()
    other = await new_merchant(services, "Other")
    async with _client(app, other.secret_key) as other_api:
        stripe_error(await other_api.get(f"/v1/customers/{customer['id']}"), 404, code="resource_missing")
        assert (await other_api.get("/v1/customers")).json()["data"] == []
