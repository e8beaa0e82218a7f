"""The sandbox's 3-D Secure page: where `next_action.redirect_to_url` sends the customer in test mode.

Reached by the customer's browser, not the merchant: it is authorized by the unguessable,
single-use token in the URL (compared in constant time), not by an API key, and rate limited
per client IP and per payment.
"""

from __future__ import annotations

import html

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from strongroom import ratelimit
from strongroom.api import http
from strongroom.api.body import read_params
from strongroom.api.errors import error_response
from strongroom.errors import InvalidRequest
from strongroom.payments import settle

router = APIRouter(include_in_schema=False)

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Strongroom sandbox: 3-D Secure</title></head>
<body><h1>3-D Secure test page</h1><p>Payment {intent}: complete or fail the authentication.</p>
<form method="post" action="{action}"><input type="hidden" name="token" value="{token}">
<button name="result" value="succeeded">Complete authentication</button>
<button name="result" value="failed">Fail authentication</button></form></body></html>"""

_CSP = {"Content-Security-Policy": "default-src 'none'; form-action 'self'", "X-Frame-Options": "DENY"}


@router.get("/v1/sandbox/3ds/{merchant_id}/{intent_id}")
async def page(request: Request, merchant_id: str, intent_id: str) -> Response:
    token = request.query_params.get("token", "")
    action = html.escape(request.url.path)
    body = _PAGE.format(intent=html.escape(intent_id), token=html.escape(token), action=action)
    return HTMLResponse(body, headers=_CSP)


@router.post("/v1/sandbox/3ds/{merchant_id}/{intent_id}")
async def complete(request: Request, merchant_id: str, intent_id: str) -> Response:
    svc = http.services(request)
    limits = svc.settings.ratelimit
    try:
        # PCI DSS 6.4.2 (SECURITY.md P10): guessing tokens costs a 429, per IP and per payment.
        per_ip = ratelimit.Limit(limits.threeds_per_ip, limits.threeds_per_ip_window_s)
        await ratelimit.check(svc.limiter, f"3ds:ip:{ratelimit.client_ip(request)}", per_ip)
        per_intent = ratelimit.Limit(limits.threeds_per_intent, limits.threeds_per_intent_window_s)
        await ratelimit.check(svc.limiter, f"3ds:intent:{merchant_id}:{intent_id}", per_intent)
    except ratelimit.Exceeded as exc:
        return error_response(exc, {**_CSP, **exc.headers()})
    params = await read_params(request)
    token, result = params.get("token"), params.get("result")
    if not isinstance(token, str) or result not in ("succeeded", "failed"):
        raise InvalidRequest("Pass token and result=succeeded|failed.", param="result")
    ctx = svc.payments
    intent = await settle.authenticate(ctx, merchant_id, intent_id, token, result == "succeeded")
    status = html.escape(intent["status"])
    body = f"<!doctype html><p>Authentication {html.escape(str(result))}. Payment status: {status}.</p>"
    return HTMLResponse(body, headers=_CSP)
