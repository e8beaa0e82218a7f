"""Security headers on every response the app sends, errors and shed requests included.

- `Cache-Control: no-store`: API answers carry customer data and card facts; no browser, proxy or
  CDN may keep a copy (PCI DSS 3.4.1 / 6.2.4, OWASP API security headers).
- `X-Content-Type-Options: nosniff`: a JSON error quoting input is never run as a page or script.
- `Referrer-Policy: no-referrer`: a URL holding an id or a client secret is not sent onward.
- `Strict-Transport-Security` (RFC 6797 §7.2: only over a secure transport) on TLS only, i.e. when
  the request came over TLS to this listener or, behind a trusted proxy, to the proxy (uvicorn sets
  the scheme from `X-Forwarded-Proto` for the addresses it trusts).

A response that set one of these itself (the card form's stricter policy) keeps its own value.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HSTS = "max-age=63072000; includeSubDomains"
ALWAYS = {
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_ALWAYS_RAW = [(name.encode(), value.encode()) for name, value in ALWAYS.items()]
_HSTS_RAW = (b"strict-transport-security", HSTS.encode())


def for_scheme(scheme: str) -> dict[str, str]:
    """The headers as a dict, for a response built outside the middleware (the 500 handler)."""
    headers = dict(ALWAYS)
    if scheme == "https":
        headers["strict-transport-security"] = HSTS
    return headers


class SecurityHeaders:
    """Plain ASGI (no task or queue per request, as the app's other middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wanted = [*_ALWAYS_RAW, _HSTS_RAW] if scope.get("scheme") == "https" else _ALWAYS_RAW

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(header for header in wanted if header[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
