"""Cross-merchant isolation (PCI tokenization T3; OWASP API1 broken object level authorization).

For every route of the app, merchant B names merchant A's objects (in the path, in a parameter or as
a list cursor) and must get A's objects treated as nonexistent, 404 `resource_missing` (400 for a
list cursor, as for an unknown id), while nothing of A's or B's state changes. The route table is
read from the app itself: a new route without a case here fails `test_every_route_has_a_case`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.routing import iter_route_contexts

from tests.conftest import new_merchant

A_EMAIL = "victim@example.com"
A_CARD = "4242424242424242"
LISTS = (
    "/v1/customers",
    "/v1/payment_methods",
    "/v1/payment_intents",
    "/v1/charges",
    "/v1/refunds",
    "/v1/events",
    "/v1/balance_transactions",
)
# Routes that serve no merchant object: they take no API key and must not reveal one.
NO_MERCHANT_DATA = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
}
# The customer's 3-D Secure page (test mode): a static form that reads no object (checked below).
STATIC_PAGES = {("GET", "/v1/sandbox/3ds/{merchant_id}/{intent_id}")}
# Routes that name no object: they answer with the caller's own data only (checked below).
OWN_ONLY = {("GET", "/v1/balance")}
# The hosted card form's page and files read no object; its card submission is authorized by a
# session's client secret, not an API key, and acts for the session's merchant only (checked below
# and in tests/vault/test_hosted_form.py).
CARD_FORM_ROUTES = {
    ("GET", "/v1/elements/card"),
    ("GET", "/v1/elements/card.js"),
    ("GET", "/v1/elements/card.css"),
    ("POST", "/v1/elements/payment_methods"),
}


@dataclass(frozen=True)
class Case:
    method: str
    route: str  # the app's path template
    path: str  # with {placeholders} for the World's ids
    params: dict[str, str] = field(default_factory=dict)
    status: int = 404
    param: str | None = "id"
    code: str = "resource_missing"
    # B's request legitimately creates B's own object (only A's state must stay unchanged).
    creates_own: bool = False

    @property
    def id(self) -> str:
        shown = ",".join(f"{k}={v}" for k, v in self.params.items() if "{" in v)
        return f"{self.method} {self.path}" + (f" [{shown}]" if shown else "")


def _case(method: str, route: str, path: str | None = None, **kwargs: Any) -> Case:
    return Case(method, route, path if path is not None else route, **kwargs)


PI = "/v1/payment_intents/{intent_id}"
CUS = "/v1/customers/{customer_id}"
PM = "/v1/payment_methods/{pm_id}"
AMOUNT = {"amount": "1000", "currency": "usd"}
CARD_FORM = {"type": "card", "card[number]": A_CARD, "card[exp_month]": "12", "card[exp_year]": "2034"}
TOKEN_PARAMS = {k: v for k, v in CARD_FORM.items() if k != "type"}

CASES = [
    # payment intents
    _case("POST", "/v1/payment_intents", params={**AMOUNT, "customer": "{a_customer}"}, param="customer"),
    _case(
        "POST",
        "/v1/payment_intents",
        params={**AMOUNT, "payment_method": "{a_pm_free}", "confirm": "true"},
        param="payment_method",
    ),
    _case("GET", "/v1/payment_intents", params={"starting_after": "{a_pi_paid}"}, status=400, param="starting_after"),
    _case("GET", "/v1/payment_intents", params={"customer": "{a_customer}"}, status=200),
    _case("GET", PI, "/v1/payment_intents/{a_pi_paid}"),
    _case("POST", PI, "/v1/payment_intents/{a_pi_confirmable}", params={"description": "mine now"}),
    _case("POST", PI, "/v1/payment_intents/{b_pi}", params={"payment_method": "{a_pm_free}"}, param="payment_method"),
    _case("POST", PI, "/v1/payment_intents/{b_pi}", params={"customer": "{a_customer}"}, param="customer"),
    _case("POST", PI + "/confirm", "/v1/payment_intents/{a_pi_confirmable}/confirm"),
    _case(
        "POST",
        PI + "/confirm",
        "/v1/payment_intents/{b_pi}/confirm",
        params={"payment_method": "{a_pm_free}"},
        param="payment_method",
    ),
    _case("POST", PI + "/capture", "/v1/payment_intents/{a_pi_capturable}/capture"),
    _case("POST", PI + "/cancel", "/v1/payment_intents/{a_pi_capturable}/cancel"),
    # charges
    _case("GET", "/v1/charges", params={"starting_after": "{a_charge}"}, status=400, param="starting_after"),
    _case("GET", "/v1/charges", params={"payment_intent": "{a_pi_paid}"}, status=200),
    _case("GET", "/v1/charges", params={"customer": "{a_customer}"}, status=200),
    _case("GET", "/v1/charges/{charge_id}", "/v1/charges/{a_charge}"),
    # refunds
    _case("POST", "/v1/refunds", params={"payment_intent": "{a_pi_paid}"}, param="payment_intent"),
    _case("POST", "/v1/refunds", params={"charge": "{a_charge}", "amount": "100"}, param="charge"),
    _case("GET", "/v1/refunds", params={"starting_after": "{a_refund}"}, status=400, param="starting_after"),
    _case("GET", "/v1/refunds", params={"payment_intent": "{a_pi_paid}"}, status=200),
    _case("GET", "/v1/refunds/{refund_id}", "/v1/refunds/{a_refund}"),
    _case("POST", "/v1/refunds/{refund_id}", "/v1/refunds/{a_refund}", params={"metadata[x]": "1"}),
    # customers
    _case("POST", "/v1/customers", params={"payment_method": "{a_pm_free}"}, param="payment_method"),
    _case("GET", "/v1/customers", params={"starting_after": "{a_customer}"}, status=400, param="starting_after"),
    _case("GET", "/v1/customers", params={"email": "{a_email}"}, status=200),
    _case("GET", CUS, "/v1/customers/{a_customer}"),
    _case("POST", CUS, "/v1/customers/{a_customer}", params={"email": "thief@example.com"}),
    _case("DELETE", CUS, "/v1/customers/{a_customer}"),
    _case("GET", CUS + "/payment_methods", "/v1/customers/{a_customer}/payment_methods", param="customer"),
    # payment methods: B storing A's card gets B's own, uncorrelatable fingerprint
    _case("POST", "/v1/payment_methods", params=CARD_FORM, status=200, creates_own=True),
    _case("GET", "/v1/payment_methods", params={"customer": "{a_customer}"}, param="customer"),
    _case("GET", "/v1/payment_methods", params={"starting_after": "{a_pm}"}, status=400, param="starting_after"),
    _case("GET", PM, "/v1/payment_methods/{a_pm}"),
    _case("POST", PM, "/v1/payment_methods/{a_pm}", params={"metadata[x]": "1"}),
    _case("POST", PM + "/attach", "/v1/payment_methods/{a_pm_free}/attach", params={"customer": "{b_customer}"}),
    _case(
        "POST",
        PM + "/attach",
        "/v1/payment_methods/{b_pm}/attach",
        params={"customer": "{a_customer}"},
        param="customer",
    ),
    _case("POST", PM + "/detach", "/v1/payment_methods/{a_pm}/detach"),
    # card tokens: B tokenizing A's card gets B's own token; A's token is missing for B, even to spend
    _case("POST", "/v1/tokens", params=TOKEN_PARAMS, status=200, creates_own=True),
    _case("GET", "/v1/tokens/{token_id}", "/v1/tokens/{a_token}"),
    _case("POST", "/v1/payment_methods", params={"type": "card", "card[token]": "{a_token}"}, param="card[token]"),
    # hosted card form sessions: B gets a session for itself only
    _case(
        "POST", "/v1/elements/sessions", params={"allowed_origin": "https://shop.example"}, status=200, creates_own=True
    ),
    # events
    _case("GET", "/v1/events", params={"starting_after": "{a_event}"}, status=400, param="starting_after"),
    _case("GET", "/v1/events/{event_id}", "/v1/events/{a_event}"),
    # balance transactions
    _case("GET", "/v1/balance_transactions", params={"starting_after": "{a_txn}"}, status=400, param="starting_after"),
    _case("GET", "/v1/balance_transactions/{txn_id}", "/v1/balance_transactions/{a_txn}"),
    # sandbox 3-D Secure completion: A's intent under B's account, with A's real token
    _case(
        "POST",
        "/v1/sandbox/3ds/{merchant_id}/{intent_id}",
        "/v1/sandbox/3ds/{b_merchant}/{a_pi_3ds}",
        params={"token": "{a_3ds_token}", "result": "succeeded"},
    ),
]


@dataclass
class World:
    a: httpx.AsyncClient
    b: httpx.AsyncClient
    ids: dict[str, str]
    a_fingerprint: str
    services: Any

    def fill(self, text: str) -> str:
        return text.format_map(self.ids)

    async def snapshot(self, *, include_b_methods: bool = True) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for key, path in (
            ("customer", "/v1/customers/{a_customer}"),
            ("pm", "/v1/payment_methods/{a_pm}"),
            ("pm_free", "/v1/payment_methods/{a_pm_free}"),
            ("pi_paid", "/v1/payment_intents/{a_pi_paid}"),
            ("pi_confirmable", "/v1/payment_intents/{a_pi_confirmable}"),
            ("pi_capturable", "/v1/payment_intents/{a_pi_capturable}"),
            ("pi_3ds", "/v1/payment_intents/{a_pi_3ds}"),
            ("charge", "/v1/charges/{a_charge}"),
            ("refund", "/v1/refunds/{a_refund}"),
            ("token", "/v1/tokens/{a_token}"),
            ("b_pi", "/v1/payment_intents/{b_pi}"),
            ("b_pm", "/v1/payment_methods/{b_pm}"),
            ("b_customer", "/v1/customers/{b_customer}"),
            ("balance", "/v1/balance"),
            ("b_balance", "/v1/balance"),
        ):
            client = self.b if key.startswith("b_") else self.a
            state[key] = (await client.get(self.fill(path))).json()
        for who, client in (("a", self.a), ("b", self.b)):
            for url in LISTS:
                if who == "b" and url == "/v1/payment_methods" and not include_b_methods:
                    continue
                page = (await client.get(url, params={"limit": 100})).json()
                state[f"{who} {url}"] = [obj["id"] for obj in page["data"]]
        sandbox = self.services.sandbox
        for who in ("a", "b"):
            merchant_id = self.ids[f"{who}_merchant"]
            state[f"{who} processor"] = (
                await sandbox.count_authorizations(merchant_id),
                await sandbox.count_captured_authorizations(merchant_id),
                await sandbox.captured_minor_by_currency(merchant_id),
                len(await sandbox.list_operations(merchant_id)),
            )
        return state


def _client(app: Any, key: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"Authorization": f"Bearer {key}"}
    )


async def _post(client: httpx.AsyncClient, path: str, **data: str) -> dict[str, Any]:
    response = await client.post(path, data=data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
async def world(app, services) -> AsyncIterator[World]:
    """Merchant A with an object in every state an attacker could change; merchant B with its own."""
    merchant_a = await new_merchant(services, "Victim")
    merchant_b = await new_merchant(services, "Attacker")
    async with _client(app, merchant_a.secret_key) as a, _client(app, merchant_b.secret_key) as b:
        customer = await _post(a, "/v1/customers", email=A_EMAIL)
        pm = await _post(a, "/v1/payment_methods", **CARD_FORM)
        await _post(a, f"/v1/payment_methods/{pm['id']}/attach", customer=customer["id"])
        pm_free = await _post(a, "/v1/payment_methods", **{**CARD_FORM, "card[number]": "5555555555554444"})
        confirmable = await _post(a, "/v1/payment_intents", **AMOUNT, payment_method=pm_free["id"])
        capturable = await _post(
            a, "/v1/payment_intents", **AMOUNT, payment_method="pm_card_visa", confirm="true", capture_method="manual"
        )
        paid = await _post(
            a, "/v1/payment_intents", **AMOUNT, customer=customer["id"], payment_method=pm["id"], confirm="true"
        )
        refund = await _post(a, "/v1/refunds", payment_intent=paid["id"], amount="100")
        card_token = await _post(a, "/v1/tokens", **TOKEN_PARAMS)
        three_ds = await _post(
            a, "/v1/payment_intents", **AMOUNT, payment_method="pm_card_threeDSecureRequired", confirm="true"
        )
        token = parse_qs(urlsplit(three_ds["next_action"]["redirect_to_url"]["url"]).query)["token"][0]
        event = (await a.get("/v1/events", params={"limit": 1})).json()["data"][0]
        txn = (await a.get("/v1/balance_transactions", params={"limit": 1})).json()["data"][0]
        b_customer = await _post(b, "/v1/customers", email="attacker@example.com")
        b_pm = await _post(b, "/v1/payment_methods", **{**CARD_FORM, "card[number]": "4000056655665556"})
        b_pi = await _post(b, "/v1/payment_intents", **AMOUNT)
        assert (capturable["status"], paid["status"], three_ds["status"]) == (
            "requires_capture",
            "succeeded",
            "requires_action",
        )
        ids = {
            "a_merchant": merchant_a.id,
            "a_email": A_EMAIL,
            "a_customer": customer["id"],
            "a_pm": pm["id"],
            "a_pm_free": pm_free["id"],
            "a_pi_confirmable": confirmable["id"],
            "a_pi_capturable": capturable["id"],
            "a_pi_paid": paid["id"],
            "a_pi_3ds": three_ds["id"],
            "a_3ds_token": token,
            "a_charge": paid["latest_charge"],
            "a_refund": refund["id"],
            "a_token": card_token["id"],
            "a_event": event["id"],
            "a_txn": txn["id"],
            "b_merchant": merchant_b.id,
            "b_customer": b_customer["id"],
            "b_pm": b_pm["id"],
            "b_pi": b_pi["id"],
        }
        yield World(a, b, ids, pm["card"]["fingerprint"], services)


def _a_secrets(world: World) -> list[str]:
    return [v for k, v in world.ids.items() if k.startswith("a_")] + [world.a_fingerprint]


def _routes(app: Any) -> set[tuple[str, str]]:
    return {
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        for method in (route.methods or set()) - {"HEAD"}
    }


def test_every_route_has_a_case(app):
    covered = (
        {(case.method, case.route) for case in CASES} | NO_MERCHANT_DATA | STATIC_PAGES | OWN_ONLY | CARD_FORM_ROUTES
    )
    assert _routes(app) == covered


def test_cases_name_real_routes_and_objects_of_the_other_merchant():
    for case in CASES:
        assert re.sub(r"\{\w+\}", "{}", case.path) == re.sub(r"\{\w+\}", "{}", case.route), case.id
        assert "{a_" in case.path + "".join(case.params.values()) or case.creates_own, case.id


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_other_merchants_object_is_missing_and_unchanged(world, case):
    before = await world.snapshot(include_b_methods=not case.creates_own)
    params = {key: world.fill(value) for key, value in case.params.items()}
    path = world.fill(case.path)
    if case.method in {"GET", "DELETE"}:
        response = await world.b.request(case.method, path, params=params)
    else:
        response = await world.b.post(path, data=params)

    assert response.status_code == case.status, response.text
    if case.status == 200:
        for secret in _a_secrets(world):
            assert secret not in response.text
    else:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == case.code
        assert error["param"] == case.param
        assert error["message"]
    assert await world.snapshot(include_b_methods=not case.creates_own) == before


async def test_balance_is_the_callers_own(world):
    a_balance = (await world.a.get("/v1/balance")).json()
    # A's capture (1000) is pending; its refund (100) was paid out of available.
    assert (a_balance["pending"], a_balance["available"]) == (
        [{"amount": 1000, "currency": "usd"}],
        [{"amount": -100, "currency": "usd"}],
    )
    response = await world.b.get("/v1/balance")
    assert response.status_code == 200, response.text
    # B has moved no money: nothing of A's balance (or ids) shows.
    assert response.json() == {"object": "balance", "available": [], "pending": [], "livemode": False}
    for secret in _a_secrets(world):
        assert secret not in response.text


async def test_three_d_secure_page_reads_nothing(world, anonymous):
    real = world.fill("/v1/sandbox/3ds/{a_merchant}/{a_pi_3ds}")
    fake = world.fill("/v1/sandbox/3ds/{b_merchant}/pi_doesnotexist")
    real_page = await anonymous.get(real, params={"token": "t"})
    fake_page = await anonymous.get(fake, params={"token": "t"})
    assert real_page.status_code == fake_page.status_code == 200
    # The same bytes once the ids from the URL are swapped: nothing of the intent is shown.
    normalized = real_page.text.replace(world.ids["a_merchant"], "M").replace(world.ids["a_pi_3ds"], "P")
    assert normalized == fake_page.text.replace(world.ids["b_merchant"], "M").replace("pi_doesnotexist", "P")


async def test_three_d_secure_completion_with_a_wrong_token_is_404(world, anonymous):
    before = await world.snapshot()
    response = await anonymous.post(
        world.fill("/v1/sandbox/3ds/{a_merchant}/{a_pi_3ds}"), data={"token": "guess", "result": "succeeded"}
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "resource_missing"
    assert await world.snapshot() == before


@pytest.mark.parametrize(("method", "path"), sorted(NO_MERCHANT_DATA))
async def test_routes_without_merchant_data_reveal_no_object(world, anonymous, method, path):
    response = await anonymous.request(method, path)
    assert response.status_code < 500
    for secret in _a_secrets(world):
        assert secret not in response.text


async def test_idempotency_keys_are_per_merchant(api, app, services):
    headers = {"Idempotency-Key": "shared-key-1"}
    mine = await api.post("/v1/customers", data={"email": "a@example.com"}, headers=headers)
    other = await new_merchant(services, "Other")
    async with _client(app, other.secret_key) as other_api:
        theirs = await other_api.post("/v1/customers", data={"email": "b@example.com"}, headers=headers)
        assert theirs.status_code == 200, theirs.text
        assert "idempotent-replayed" not in theirs.headers
        assert theirs.json()["id"] != mine.json()["id"]
        assert theirs.json()["email"] == "b@example.com"
        replay = await other_api.post("/v1/customers", data={"email": "b@example.com"}, headers=headers)
        assert replay.json() == theirs.json()


async def test_card_form_submission_acts_for_the_sessions_merchant_only(world):
    """B's card form session stores the card as B's, whatever API key rides along; A sees nothing."""
    before = await world.snapshot(include_b_methods=False)
    session = await _post(world.b, "/v1/elements/sessions", allowed_origin="https://shop.example")
    card = {**TOKEN_PARAMS, "card[number]": "4000056655665556"}
    # Sent with A's API key: the form is authorized by the session alone (and its page's origin).
    data = {"client_secret": session["client_secret"], **card}
    response = await world.a.post("/v1/elements/payment_methods", data=data, headers={"Origin": "https://shop.example"})
    assert response.status_code == 200, response.text
    pm = response.json()
    assert (await world.b.get(f"/v1/payment_methods/{pm['id']}")).status_code == 200
    assert (await world.a.get(f"/v1/payment_methods/{pm['id']}")).status_code == 404
    assert await world.snapshot(include_b_methods=False) == before
