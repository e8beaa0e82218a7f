"""PCI DSS 6.2.4 (SECURITY.md P9): schemathesis fuzzes the live server's /openapi.json.

Every operation gets the examples, coverage and fuzzing phases with positive and negative data
(wrong types, out-of-range values, unknown fields, odd unicode, malformed bodies). The server must
never answer 5xx, and every answer must match the documented status codes, content types,
headers and response schemas. Path ids are half the time real objects of the merchant (so
capture, confirm, refund … reach their logic instead of a 404) and half the time generated
strings (so odd ids reach the database lookups). Runs are reproducible: fixed seed,
derandomized Hypothesis, no example database.

The schema is loaded from the `api_schema` fixture (`schemathesis.pytest.from_fixture`): the
server, and so its URL, exists only once the session-scoped `server` fixture has started it.

The regression tests at the end pin what fuzzing found in src/ (see each docstring).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = 25

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    # The same request without credentials (or with made-up ones) must be refused with 401.
    checks.ignored_auth,
    # Undeclared methods (TRACE, PUT …) must be refused with 405 and an `Allow` header listing
    # exactly the documented methods of the path.
    checks.unsupported_method,
    checks.allow_header_conformance,
    checks.missing_required_header,
]
# Left out, on purpose (negative data is still generated: it must never cause a 5xx or an
# undocumented answer):
# - negative_data_rejection: the API deliberately accepts Stripe's form-encoding idioms that the
#   JSON schema calls invalid: "12" for an integer (form values are strings), metadata="" (unset
#   all keys), metadata as a list (all-digit keys `metadata[0]=…` decode to one). Fuzzing found
#   exactly these (e.g. POST /v1/payment_methods with "metadata": []): false positives.
# - positive_data_acceptance: the schema cannot express rules that need more than one field or
#   the database (currency must be an ISO 4217 code, a refund needs exactly one of
#   payment_intent/charge, a card number must pass Luhn (402 invalid_number), a cursor must name
#   an object in the list, `expand` takes only expandable fields): schema-valid requests are
#   rightly refused with 400/402/404, false positives again.
# - use_after_free, ensure_resource_availability, object_level_authorization: they follow OpenAPI
#   links between operations (stateful phase) and the schema declares none; cross-merchant
#   isolation is tested directly in test_stripe_sdk.py (another merchant's objects are 404).
# - max_response_time: timing-dependent, so not reproducible on a shared CI machine.


def _form(client: httpx.Client, path: str, data: dict[str, str]) -> dict[str, Any]:
    response = client.post(path, data=data)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _real_ids(server: Server) -> dict[str, list[str]]:
    """Objects of the fuzzed merchant for every path parameter, in several states."""
    headers = {"Authorization": f"Bearer {server.secret_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        customer = _form(client, "/v1/customers", {"email": "fuzz@example.com"})
        card = {"type": "card", "card[number]": "4242424242424242", "card[exp_month]": "12", "card[exp_year]": "2034"}
        pm = _form(client, "/v1/payment_methods", card)
        pay = {"currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}
        paid = _form(client, "/v1/payment_intents", {"amount": "100000", **pay})
        authorized = _form(client, "/v1/payment_intents", {"amount": "50000", "capture_method": "manual", **pay})
        unconfirmed = _form(client, "/v1/payment_intents", {"amount": "700", "currency": "eur"})
        refund = _form(client, "/v1/refunds", {"payment_intent": paid["id"], "amount": "100"})
        events = client.get("/v1/events", params={"limit": 3}).json()["data"]
    return {
        "customer_id": [customer["id"]],
        "pm_id": [pm["id"]],
        "intent_id": [paid["id"], authorized["id"], unconfirmed["id"]],
        "charge_id": [paid["latest_charge"], authorized["latest_charge"]],
        "refund_id": [refund["id"]],
        "event_id": [event["id"] for event in events],
    }


@pytest.fixture
def api_schema(server: Server) -> schemathesis.BaseSchema:
    ids = _real_ids(server)
    config = schemathesis.Config.from_dict(
        {
            "seed": 624,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "dictionaries": {name: {"values": values} for name, values in ids.items()},
            "parameters": {f"path.{name}": {"dictionary": name, "probability": 0.5} for name in ids},
        }
    )
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)


@pytest.fixture(autouse=True)
def _pytest_9_2_node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32's lazy loader reads and rewrites the private `Node._nodeid`, which pytest 9.2
    no longer has (node ids are built from `Node._id`): give it one so `from_fixture` works."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


# Repeatable runs over every operation: the same examples each time, no example database.
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)

schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@FUZZ
def test_pci_6_2_4_schemathesis_no_5xx_and_responses_match_schema(case: schemathesis.Case, server: Server) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {server.secret_key}"}, checks=CHECKS, timeout=30)


# --- the routes left out of /openapi.json -------------------------------------------------------
# The browser's routes (card form, 3-D Secure) and the operational ones are not in the published
# schema, but they face the internet all the same (issue 17: a 500 on the 3-D Secure completion
# escaped fuzzing). They are described here so that fuzzing reaches their logic, and any served
# route neither here nor in /openapi.json gets a generic description (its path parameters as
# strings, any query, any form body): no route the app serves is left out.

_TEXT = {"type": "string"}
_ANY_ANSWER = {"default": {"description": "any answer but a 5xx"}}
_3DS_PARAMS = [
    {"name": "merchant_id", "in": "path", "required": True, "schema": _TEXT},
    {"name": "intent_id", "in": "path", "required": True, "schema": _TEXT},
]


def _form_body(**fields: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": fields, "additionalProperties": _TEXT}
    return {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": schema}}}


HIDDEN_OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", "/v1/elements/card"): {"parameters": [{"name": "session", "in": "query", "schema": _TEXT}]},
    ("POST", "/v1/elements/payment_methods"): {
        "requestBody": _form_body(
            client_secret=_TEXT,
            **{f"card[{k}]": _TEXT for k in ("number", "exp_month", "exp_year", "cvc")},
            **{"billing_details[name]": _TEXT},
        )
    },
    ("GET", "/v1/sandbox/3ds/{merchant_id}/{intent_id}"): {
        "parameters": [*_3DS_PARAMS, {"name": "token", "in": "query", "schema": _TEXT}]
    },
    ("POST", "/v1/sandbox/3ds/{merchant_id}/{intent_id}"): {
        "parameters": _3DS_PARAMS,
        "requestBody": _form_body(token=_TEXT, result={"type": "string", "enum": ["succeeded", "failed", "x"]}),
    },
}


def _served_routes() -> set[tuple[str, str]]:
    """Every (method, path) the app serves: routes are fixed when the app is built."""
    from fastapi.routing import iter_route_contexts

    from strongroom.app import create_app
    from strongroom.settings import Settings

    app = create_app(Settings(), background=False)
    return {
        (method, route.path)
        for route in iter_route_contexts(app.routes)
        for method in (getattr(route, "methods", None) or set()) - {"HEAD"}
    }


def _with_examples(operation: dict[str, Any], ids: dict[str, list[str]]) -> dict[str, Any]:
    """Real ids as the examples phase's path parameters, and a non-ASCII secret beside them (the
    issue's 500 needed all three at once: random generation seldom meets them)."""
    parameters = [
        {**param, "example": ids[param["name"]][0]} if param["in"] == "path" and param["name"] in ids else param
        for param in operation.get("parameters", [])
    ]
    examples = {"token": "été", "result": "succeeded", "client_secret": "été"}
    body = operation.get("requestBody")
    if body is not None:
        media = body["content"]["application/x-www-form-urlencoded"]
        wanted = {k: v for k, v in examples.items() if k in media["schema"]["properties"]}
        body = {**body, "content": {"application/x-www-form-urlencoded": {**media, "example": wanted}}}
        return {**operation, "parameters": parameters, "requestBody": body}
    return {**operation, "parameters": parameters}


def _undocumented_schema(
    server_url: str, documented: dict[str, Any], ids: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    published = {(m.upper(), path) for path, ops in documented["paths"].items() for m in ops}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in sorted(_served_routes() - published):
        operation = HIDDEN_OPERATIONS.get((method, path))
        if operation is not None and ids is not None:
            operation = _with_examples(operation, ids)
        if operation is None:
            names = [part[1:-1] for part in path.split("/") if part.startswith("{")]
            operation = {"parameters": [{"name": n, "in": "path", "required": True, "schema": _TEXT} for n in names]}
            if method in ("POST", "PUT", "PATCH"):
                operation["requestBody"] = _form_body()
        paths.setdefault(path, {})[method.lower()] = {**operation, "responses": _ANY_ANSWER}
    return {
        "openapi": "3.0.3",
        "info": {"title": "Strongroom: routes left out of /openapi.json", "version": "1"},
        "servers": [{"url": server_url}],
        "paths": paths,
    }


def _browser_ids(server: Server) -> dict[str, list[str]]:
    """Real values for the keyless routes: the merchant, an intent awaiting 3-D Secure and its
    token, a card-form session."""
    headers = {"Authorization": f"Bearer {server.secret_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        card = {"type": "card", "card[number]": "4000002500003155", "card[exp_month]": "12", "card[exp_year]": "2034"}
        pm = _form(client, "/v1/payment_methods", card)
        pay = {"amount": "1500", "currency": "usd", "payment_method": pm["id"], "confirm": "true"}
        intent = _form(client, "/v1/payment_intents", pay)
        session = _form(client, "/v1/elements/sessions", {"allowed_origin": "https://shop.example"})
    token = intent["next_action"]["redirect_to_url"]["url"].partition("token=")[2]
    return {
        "merchant_id": [server.merchant_id],
        "intent_id": [intent["id"]],
        "token": [token],
        "session": [session["client_secret"]],
        "client_secret": [session["client_secret"]],
    }


@pytest.fixture
def undocumented_schema(server: Server) -> schemathesis.BaseSchema:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        documented = client.get("/openapi.json").json()
    ids = _browser_ids(server)
    config = schemathesis.Config.from_dict(
        {
            "seed": 624,
            "generation": {"mode": "all", "max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
            "dictionaries": {name: {"values": values} for name, values in ids.items()},
            "parameters": {
                **{f"path.{name}": {"dictionary": name, "probability": 0.5} for name in ("merchant_id", "intent_id")},
                **{f"query.{name}": {"dictionary": name, "probability": 0.5} for name in ("token", "session")},
                "body.client_secret": {"dictionary": "client_secret", "probability": 0.5},
                "body.token": {"dictionary": "token", "probability": 0.5},
            },
        }
    )
    loaded = schemathesis.openapi.from_dict(_undocumented_schema(server.url, documented, ids), config=config)
    loaded.config.update(base_url=server.url)
    return loaded


undocumented = schemathesis.pytest.from_fixture("undocumented_schema")


@undocumented.parametrize()
@FUZZ
def test_pci_6_2_4_schemathesis_no_5xx_on_routes_left_out_of_openapi(case: schemathesis.Case, server: Server) -> None:
    # A browser's request: the form's own origin, so the card form's checks are passed and
    # fuzzing reaches the card's parsing and storage.
    case.call_and_validate(headers={"Origin": server.url}, checks=[checks.not_a_server_error], timeout=30)


def test_every_route_left_out_of_openapi_is_fuzzed(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        documented = client.get("/openapi.json").json()
    supplement = _undocumented_schema(server.url, documented)["paths"]
    fuzzed = {(m.upper(), path) for path, ops in supplement.items() for m in ops}
    published = {(m.upper(), path) for path, ops in documented["paths"].items() for m in ops}
    assert _served_routes() <= fuzzed | published
    # The described routes are still served (a rename must move its description along).
    assert set(HIDDEN_OPERATIONS) <= fuzzed


# --- regressions found by fuzzing --------------------------------------------------------------


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {server.secret_key}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        yield client


def test_json_null_for_a_not_null_field_is_not_a_server_error(api: httpx.Client) -> None:
    """Fuzzing: POST /v1/payment_intents/{id} {"capture_method": null} was a 500 (NOT NULL
    violation). A null leaves a non-nullable field unchanged; nullable ones are cleared."""
    created = _form(api, "/v1/payment_intents", {"amount": "900", "currency": "usd", "description": "d"})
    for field in ("capture_method", "amount", "currency", "customer", "payment_method", "metadata"):
        response = api.post(f"/v1/payment_intents/{created['id']}", json={field: None})
        assert response.status_code == 200, (field, response.text)
        assert response.json()["capture_method"] == "automatic"
    cleared = api.post(f"/v1/payment_intents/{created['id']}", json={"description": None})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["description"] is None


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/v1/customers/cus_%00", {}),
        ("GET", "/v1/customers", {"params": {"email": "a\x00b"}}),
        ("GET", "/v1/payment_intents", {"params": {"customer\x00": "x"}}),
        ("POST", "/v1/customers", {"data": {"email": "a\x00b@example.com"}}),
        ("POST", "/v1/customers", {"json": {"metadata": {"k\x00": "v"}}}),
        ("POST", "/v1/customers", {"json": {"name": "nul\x00name"}}),
        ("POST", "/v1/payment_intents", {"json": {"amount": 100, "currency": "usd", "expand": ["x\x00"]}}),
    ],
)
def test_nul_characters_are_refused_on_every_database(
    api: httpx.Client, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    """PostgreSQL text and JSON cannot hold U+0000: these were 500s there (and stored on SQLite).
    Now a 400 invalid_request_error on both."""
    response = api.request(method, path, **kwargs)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "NUL" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/v1/customers", {"GET", "POST"}),
        ("/v1/customers/cus_x", {"GET", "POST", "DELETE"}),
        ("/v1/payment_intents/pi_x/capture", {"POST"}),
    ],
)
def test_405_allow_lists_every_method_of_the_path(api: httpx.Client, path: str, allowed: set[str]) -> None:
    """Fuzzing: 405s had no `Allow` (RFC 9110 §15.5.6), then only the first route's methods."""
    response = api.request("PUT", path)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == allowed


def test_request_bodies_with_required_parameters_are_documented_as_required(api: httpx.Client) -> None:
    """Fuzzing: every body was `required: false`, so empty bodies were "valid" for create calls."""
    spec = api.get("/openapi.json").json()
    required = {
        f"{method.upper()} {path}"
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if operation.get("requestBody", {}).get("required")
    }
    assert required == {
        "POST /v1/payment_intents",
        "POST /v1/payment_methods",
        "POST /v1/payment_methods/{pm_id}/attach",
        "POST /v1/tokens",
        "POST /v1/elements/sessions",
    }
