"""The hosted card form in a real browser: Debian's Chromium driven by Playwright, a real server
process (the vault's origin) and small local HTTP servers on other ports (other origins) serving
the merchant's checkout page and an attacker's.

What the customer and the merchant would notice: the card typed in the frame reaches the shop only
as a `pm_…` id that can pay; the shop's page cannot read the frame's inputs; a page on an origin
the session does not name cannot frame the form; messages from other origins are ignored; card
errors show in the frame; and the legitimate flow raises no Content-Security-Policy violation.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Frame, Page, async_playwright
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Server

pytestmark = pytest.mark.e2e
# The real `strongroom serve` process of the end-to-end suite (SQLite, and PostgreSQL when set).
server = e2e.server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VISA = "4242424242424242"
PM_MESSAGE = "() => window.received.some((m) => m.data && m.data.type === 'strongroom.payment_method')"
WAIT_MS = 15_000
# How long an ignored message is given to (wrongly) cause a submission before the test looks.
QUIET_S = 1.5


class Origin:
    """A tiny HTTP server on its own port: a separate web origin serving fixed pages."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture(scope="module")
def shop() -> Iterator[Origin]:
    origin = Origin()
    yield origin
    origin.close()


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[Origin]:
    origin = Origin()
    origin.pages["/blank.html"] = "<!doctype html><title>elsewhere</title><p>another origin</p>"
    yield origin
    origin.close()


def _chromium() -> str:
    # CI installs Debian's chromium (.ci/run); no browser is ever downloaded.
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: apt-get install chromium"
    return str(CHROMIUM)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        yield launched
        await launched.close()


class Tab:
    """A page with its console and the responses of the vault's form page recorded."""

    def __init__(self, page: Page, vault_url: str) -> None:
        self.page = page
        self.console: list[str] = []
        self.form_responses: list[dict[str, str]] = []

        def on_console(message: ConsoleMessage) -> None:
            self.console.append(message.text)

        async def on_response(response: Any) -> None:
            if response.url.startswith(f"{vault_url}/v1/elements/card?"):
                self.form_responses.append(await response.all_headers())

        page.on("console", on_console)
        page.on("response", on_response)

    def csp_violations(self) -> list[str]:
        return [text for text in self.console if "Content Security Policy" in text or "Refused to" in text]

    async def received(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = await self.page.evaluate("() => window.received")
        return messages

    def card_frame(self) -> Frame:
        return next(f for f in self.page.frames if f.name == "card")


@pytest.fixture
async def tab(browser: Browser, server: Server) -> AsyncIterator[Tab]:
    context = await browser.new_context()
    page = await context.new_page()
    yield Tab(page, server.url)
    await context.close()


def _api(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.secret_key}"}, timeout=10)


def _session(server: Server, allowed_origin: str) -> dict[str, Any]:
    with _api(server) as api:
        response = api.post("/v1/elements/sessions", data={"allowed_origin": allowed_origin})
    assert response.status_code == 200, response.text
    session: dict[str, Any] = response.json()
    return session


def _checkout_page(form_url: str, extra_frame: str = "") -> str:
    # The listener is registered before the frames load: no message can arrive unheard.
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Shop checkout</title></head><body>
<script>
window.received = [];
window.addEventListener('message', (e) => window.received.push({{origin: e.origin, data: e.data}}));
</script>
<iframe id="card" name="card" src="{form_url}" width="420" height="320"></iframe>
{extra_frame}
</body></html>"""


def _payment_method_count(server: Server) -> int:
    with _api(server) as api:
        return len(api.get("/v1/payment_methods", params={"limit": 100}).json()["data"])


async def _open_checkout(tab: Tab, shop: Origin, server: Server, extra_frame: str = "") -> dict[str, Any]:
    session = _session(server, shop.url)
    shop.pages["/checkout.html"] = _checkout_page(session["url"], extra_frame)
    await tab.page.goto(f"{shop.url}/checkout.html")
    await tab.page.frame_locator("#card").locator("#card-form").wait_for(timeout=WAIT_MS)
    return session


async def _fill(tab: Tab, number: str, expiry: str = "12 / 34", cvc: str = "123") -> None:
    form = tab.page.frame_locator("#card")
    await form.locator("#card-number").fill(number)
    await form.locator("#card-expiry").fill(expiry)
    await form.locator("#card-cvc").fill(cvc)


async def test_card_typed_in_the_frame_reaches_the_shop_only_as_a_payment_method_id_that_pays(tab, shop, server):
    await _open_checkout(tab, shop, server)
    await _fill(tab, "4242 4242 4242 4242")
    await tab.page.frame_locator("#card").locator("#card-submit").click()
    await tab.page.wait_for_function(PM_MESSAGE, timeout=WAIT_MS)

    received = await tab.received()
    pm_messages = [m for m in received if m["data"].get("type") == "strongroom.payment_method"]
    assert len(pm_messages) == 1
    assert pm_messages[0]["origin"] == server.url
    pm_id = pm_messages[0]["data"]["id"]
    assert pm_messages[0]["data"] == {"type": "strongroom.payment_method", "id": pm_id}
    assert pm_id.startswith("pm_")
    assert VISA not in json.dumps(received)
    with _api(server) as api:
        pm = api.get(f"/v1/payment_methods/{pm_id}").json()
        assert (pm["card"]["brand"], pm["card"]["last4"]) == ("visa", "4242")
        intent = api.post(
            "/v1/payment_intents",
            data={"amount": "1999", "currency": "usd", "payment_method": pm_id, "confirm": "true"},
        )
        assert intent.status_code == 200, intent.text
        assert intent.json()["status"] == "succeeded"
    assert tab.csp_violations() == []


async def test_form_page_is_served_with_the_strict_csp_naming_the_shop(tab, shop, server):
    await _open_checkout(tab, shop, server)

    assert len(tab.form_responses) == 1
    headers = tab.form_responses[0]
    assert headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; form-action 'none'; "
        f"frame-ancestors {shop.url}; base-uri 'none'"
    )
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["cache-control"] == "no-store"
    inline = await tab.card_frame().evaluate(
        "() => Array.from(document.scripts).filter((s) => !s.src || s.textContent.trim() !== '').length"
    )
    assert inline == 0


async def test_shop_page_cannot_read_the_frames_inputs(tab, shop, server):
    await _open_checkout(tab, shop, server)
    await _fill(tab, "4242 4242 4242 4242")

    seen = await tab.page.evaluate(
        """() => {
            const frame = document.getElementById('card');
            let error = null;
            try {
                return {value: frame.contentWindow.document.getElementById('card-number').value};
            } catch (e) {
                error = e.name;
            }
            return {contentDocument: frame.contentDocument, error: error};
        }"""
    )

    assert seen == {"contentDocument": None, "error": "SecurityError"}


async def test_page_on_an_origin_the_session_does_not_name_cannot_frame_the_form(tab, shop, elsewhere, server):
    session = _session(server, shop.url)
    elsewhere.pages["/steal.html"] = _checkout_page(session["url"])

    await tab.page.goto(f"{elsewhere.url}/steal.html")
    await tab.page.wait_for_load_state("load")
    for _ in range(50):
        if any("frame-ancestors" in text for text in tab.console):
            break
        await asyncio.sleep(0.1)

    assert any("frame-ancestors" in text for text in tab.console), tab.console
    assert await tab.card_frame().query_selector("#card-number") is None
    assert [m for m in await tab.received() if m["origin"] == server.url] == []


async def test_messages_from_another_origin_are_ignored_and_the_shops_are_obeyed(tab, shop, elsewhere, server):
    spy = f'<iframe id="spy" name="spy" src="{elsewhere.url}/blank.html"></iframe>'
    await _open_checkout(tab, shop, server, extra_frame=spy)
    await _fill(tab, "4242 4242 4242 4242")
    before = _payment_method_count(server)
    spy_frame = next(f for f in tab.page.frames if f.name == "spy")
    await spy_frame.wait_for_load_state("load")

    await spy_frame.evaluate(
        """() => {
            const card = window.parent.frames['card'];
            card.postMessage({type: 'strongroom.submit'}, '*');
            card.postMessage({type: 'strongroom.clear'}, '*');
        }"""
    )
    await asyncio.sleep(QUIET_S)

    assert not await tab.page.evaluate(PM_MESSAGE)
    assert _payment_method_count(server) == before
    assert await tab.card_frame().locator("#card-number").input_value() == "4242 4242 4242 4242"

    await tab.page.evaluate(
        "(vault) => document.getElementById('card').contentWindow.postMessage({type: 'strongroom.submit'}, vault)",
        server.url,
    )
    await tab.page.wait_for_function(PM_MESSAGE, timeout=WAIT_MS)
    assert _payment_method_count(server) == before + 1


async def test_card_error_is_shown_in_the_frame_and_only_its_code_reaches_the_shop(tab, shop, server):
    await _open_checkout(tab, shop, server)
    before = _payment_method_count(server)
    await _fill(tab, "4242 4242 4242 4241")
    form = tab.page.frame_locator("#card")
    await form.locator("#card-submit").click()

    error = form.locator("#card-error")
    await error.filter(has_text="Your card number is incorrect.").wait_for(timeout=WAIT_MS)
    assert await form.locator("#card-number").get_attribute("aria-invalid") == "true"
    received = await tab.received()
    assert [m["data"] for m in received if m["data"].get("type") == "strongroom.error"] == [
        {"type": "strongroom.error", "code": "incorrect_number"}
    ]
    assert "4242424242424241" not in json.dumps(received)
    assert _payment_method_count(server) == before
    assert tab.csp_violations() == []
