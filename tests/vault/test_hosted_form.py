"""The hosted card form over HTTP: sessions need a secret key and expire, a session cannot be forged
or moved to another merchant, the page is served under the strict Content-Security-Policy with no
inline script, and card errors are Stripe's, with no card number in any response (PCI DSS 3.4.1).
The browser's side (frame-ancestors, postMessage origins) is in test_hosted_form_browser.py."""

from __future__ import annotations

import time
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from tests.conftest import new_merchant

from strongroom.auth import service as auth_service
from strongroom.sensitive import Secret
from strongroom.vault import elements

ORIGIN = "https://shop.example"
VISA = "4242424242424242"
# The form's own origin: the test settings' `public_url`, where the session's `url` points.
FORM_ORIGIN = "http://127.0.0.1:8080"
# What a browser sends when it loads the form into an iframe.
BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; form-action 'none'; "
    "frame-ancestors https://shop.example; base-uri 'none'"
)


def _card(number: str = VISA, exp_month: str = "12", exp_year: str = "2034", **extra: str) -> dict[str, str]:
    data = {"card[number]": number, "card[exp_month]": exp_month, "card[exp_year]": exp_year}
    data.update({f"card[{k}]": v for k, v in extra.items()})
    return data


async def _session(api: httpx.AsyncClient, origin: str = ORIGIN) -> dict[str, Any]:
    response = await api.post("/v1/elements/sessions", data={"allowed_origin": origin})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _submit(
    client: httpx.AsyncClient, client_secret: str, origin: str | None = FORM_ORIGIN, **card: str
) -> httpx.Response:
    """What the form's script sends: a browser adds the page's `Origin` to every POST."""
    headers = {"Origin": origin} if origin is not None else {}
    data = {"client_secret": client_secret, **card}
    return await client.post("/v1/elements/payment_methods", data=data, headers=headers)


def _page_path(session: dict[str, Any]) -> str:
    url = urlsplit(session["url"])
    return f"{url.path}?{url.query}"


def _assert_security_headers(response: httpx.Response, frame_ancestors: str) -> None:
    expected = CSP.replace("https://shop.example", frame_ancestors)
    assert response.headers["content-security-policy"] == expected
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


class _Scripts(HTMLParser):
    """Every script element, inline handler attribute and inline style of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_code: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name.startswith("on") or name == "style" or (value or "").strip().lower().startswith("javascript:"):
                self.inline_code.append(f"{tag} {name}")
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "style":
            self.inline_code.append("style element")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_code.append(f"inline script: {data[:40]}")


async def test_session_needs_a_secret_key(anonymous):
    response = await anonymous.post("/v1/elements/sessions", data={"allowed_origin": ORIGIN})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_session_has_a_client_secret_a_form_url_and_a_short_lifetime(api):
    before = int(time.time())
    session = await _session(api)
    assert session["object"] == "elements_session"
    assert session["id"].startswith("elements_session_")
    assert session["client_secret"].startswith(session["id"] + "_secret_")
    assert session["allowed_origin"] == ORIGIN
    assert session["livemode"] is False
    assert before + elements.SESSION_TTL_S <= session["expires_at"] <= int(time.time()) + elements.SESSION_TTL_S
    url = urlsplit(session["url"])
    assert url.path == "/v1/elements/card"
    assert parse_qs(url.query) == {"session": [session["client_secret"]]}


@pytest.mark.parametrize(
    "origin",
    [
        "https://shop.example/",
        "https://shop.example/checkout",
        "https://Shop.example",
        "https://shop.example:99999",
        "https://shop.example; script-src *",
        "https://shop.example https://evil.example",
        "*",
        "'self'",
        "null",
        "javascript:alert(1)",
        "ftp://shop.example",
        "https://user@shop.example",
    ],
)
async def test_session_refuses_anything_but_one_serialized_origin(api, origin):
    response = await api.post("/v1/elements/sessions", data={"allowed_origin": origin})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "allowed_origin"


async def test_live_mode_session_needs_an_https_origin(app, merchant, services):
    async with services.db.tx() as conn:
        live_key = await auth_service.create_api_key(conn, services.hasher, merchant.id, livemode=True)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {live_key.reveal()}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as live:
        plain = await live.post("/v1/elements/sessions", data={"allowed_origin": "http://shop.example"})
        secure = await live.post("/v1/elements/sessions", data={"allowed_origin": ORIGIN})

    assert plain.status_code == 400, plain.text
    assert plain.json()["error"]["param"] == "allowed_origin"
    assert secure.status_code == 200, secure.text
    assert secure.json()["livemode"] is True


async def test_session_creation_honours_the_idempotency_key(api):
    headers = {"Idempotency-Key": "elements-session-1"}
    first = await api.post("/v1/elements/sessions", data={"allowed_origin": ORIGIN}, headers=headers)
    replay = await api.post("/v1/elements/sessions", data={"allowed_origin": ORIGIN}, headers=headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()


async def test_page_is_served_under_the_strict_csp_with_no_inline_script(api, anonymous):
    session = await _session(api)
    response = await anonymous.get(_page_path(session))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    _assert_security_headers(response, ORIGIN)
    parsed = _Scripts()
    parsed.feed(response.text)
    assert parsed.inline_code == []
    assert [s.get("src") for s in parsed.scripts] == ["/v1/elements/card.js"]
    assert f'data-allowed-origin="{ORIGIN}"' in response.text


@pytest.mark.parametrize(("name", "content_type"), [("card.js", "text/javascript"), ("card.css", "text/css")])
async def test_script_and_style_are_served_with_their_type_and_nosniff(anonymous, name, content_type):
    response = await anonymous.get(f"/v1/elements/{name}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].split(";")[0] == content_type
    _assert_security_headers(response, "'none'")


async def test_script_posts_only_to_the_vault_and_names_the_parent_origin(anonymous):
    script = (await anonymous.get("/v1/elements/card.js")).text
    assert "fetch('/v1/elements/payment_methods'" in script
    assert script.count("postMessage(") == 1
    assert "postMessage(message, allowedOrigin)" in script
    assert "'*'" not in script
    assert "event.origin !== allowedOrigin" in script


async def test_unknown_static_file_is_a_404(anonymous):
    response = await anonymous.get("/v1/elements/..%2F..%2Fapp.py")
    assert response.status_code == 404


async def test_forged_session_page_may_not_be_framed_and_submission_is_refused(api, anonymous):
    session = await _session(api)
    secret = session["client_secret"]
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")

    page = await anonymous.get("/v1/elements/card", params={"session": forged}, headers=BROWSER)
    as_api = await anonymous.get("/v1/elements/card", params={"session": forged})
    submitted = await _submit(anonymous, forged, **_card())

    assert page.status_code == 401
    _assert_security_headers(page, "'none'")
    assert "card-form" not in page.text
    assert as_api.status_code == 401
    assert as_api.json()["error"]["type"] == "invalid_request_error"
    assert submitted.status_code == 401, submitted.text
    assert submitted.json()["error"]["type"] == "invalid_request_error"
    assert (await api.get("/v1/payment_methods")).json()["data"] == []


async def test_another_merchants_session_cannot_be_moved_to_a_different_id(app, api, services, anonymous):
    other = await new_merchant(services, "Other")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as other_api:
        theirs = await _session(other_api)
        mine = await _session(api)
        # B's sealed session under A's session id: the seal is bound to its id (AEAD additional data).
        spliced = mine["id"] + "_secret_" + theirs["client_secret"].partition("_secret_")[2]
        response = await _submit(anonymous, spliced, **_card())

        assert response.status_code == 401, response.text
        for client in (api, other_api):
            assert (await client.get("/v1/payment_methods")).json()["data"] == []


async def test_expired_session_shows_an_error_in_the_frame_and_stores_nothing(api, merchant, services, anonymous):
    sealer = elements.SessionSealer(Secret(services.hasher.digest(elements.KEY_LABEL)))
    expired = elements.Session("elements_session_" + "x" * 24, merchant.id, False, ORIGIN, int(time.time()) - 1)
    secret = sealer.seal(expired)

    page = await anonymous.get("/v1/elements/card", params={"session": secret}, headers=BROWSER)
    as_api = await anonymous.get("/v1/elements/card", params={"session": secret})
    submitted = await _submit(anonymous, secret, **_card())

    assert page.status_code == 400
    _assert_security_headers(page, ORIGIN)
    assert "This card form has expired." in page.text
    assert "card.js" not in page.text
    assert as_api.status_code == 400
    assert as_api.json()["error"]["code"] == "elements_session_expired"
    assert submitted.status_code == 400, submitted.text
    assert submitted.json()["error"]["code"] == "elements_session_expired"
    assert (await api.get("/v1/payment_methods")).json()["data"] == []


async def test_submitted_card_becomes_the_sessions_merchants_payment_method(app, api, services, anonymous):
    session = await _session(api)
    response = await _submit(anonymous, session["client_secret"], **_card(cvc="123"))

    assert response.status_code == 200, response.text
    _assert_security_headers(response, "'none'")
    pm = response.json()
    assert pm["id"].startswith("pm_")
    assert (pm["card"]["brand"], pm["card"]["last4"]) == ("visa", "4242")
    assert VISA not in response.text
    assert (await api.get(f"/v1/payment_methods/{pm['id']}")).status_code == 200
    other = await new_merchant(services, "Other")
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {other.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as other_api:
        assert (await other_api.get(f"/v1/payment_methods/{pm['id']}")).status_code == 404


@pytest.mark.parametrize(
    ("card", "status", "type_", "code", "param"),
    [
        (_card("4242424242424241"), 402, "card_error", "incorrect_number", "card[number]"),
        (_card("4242"), 402, "card_error", "invalid_number", "card[number]"),
        (_card(VISA, exp_month="13"), 402, "card_error", "invalid_expiry_month", "card[exp_month]"),
        (_card(VISA, exp_year="2001"), 402, "card_error", "invalid_expiry_year", "card[exp_year]"),
        (_card(VISA, cvc="1"), 402, "card_error", "invalid_cvc", "card[cvc]"),
        ({"card[number]": VISA, "card[exp_month]": "12"}, 400, "invalid_request_error", "parameter_missing", None),
        ({**_card(), "card[token]": "tok_x"}, 400, "invalid_request_error", "parameter_unknown", "card[token]"),
    ],
    ids=["luhn", "short", "month", "year", "cvc", "missing-year", "unknown-param"],
)
async def test_p2_bad_card_is_a_stripe_error_without_the_card_number(api, anonymous, card, status, type_, code, param):
    session = await _session(api)
    response = await _submit(anonymous, session["client_secret"], **card)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    if param is not None:
        assert error["param"] == param
    assert error["message"]
    assert card["card[number]"] not in response.text
    assert (await api.get("/v1/payment_methods")).json()["data"] == []
