"""`/docs`: the API reference as one server-rendered page, without a line of script.

FastAPI's default /docs loads swagger-ui from a third-party CDN: code from elsewhere, running on
the origin that also serves the hosted card form. No maintained Python package ships swagger-ui's
files without more baggage (swagger-ui-bundle's last release is from 2023 and carries the swagger-ui
of then; drf-spectacular-sidecar needs Django), and swagger-ui itself would put a large script on
this origin. So the page is rendered here from the same OpenAPI document as `/openapi.json`, with
every value escaped, and served under a Content-Security-Policy that loads nothing and runs no
script; its `sandbox` directive gives the page an opaque origin, so it is never on the card form's
origin although the same server serves both. Off by default in production (`http.docs_enabled`).
"""

from __future__ import annotations

import base64
import hashlib
import html
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import HTMLResponse

_STYLE = (
    "body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
    "code{background:#f3f3f3;padding:0 .2em}.m{font-weight:bold;display:inline-block;width:4.5em}"
    "li{margin:.15em 0}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'; sandbox"
)
_METHODS = ("get", "post", "put", "patch", "delete")


def _parameters(operation: dict[str, Any], schemas: dict[str, Any]) -> list[str]:
    names = [str(p.get("name")) for p in operation.get("parameters", [])]
    content = operation.get("requestBody", {}).get("content", {})
    for media in content.values():
        ref = str(media.get("schema", {}).get("$ref", ""))
        names.extend(schemas.get(ref.rsplit("/", 1)[-1], {}).get("properties", {}))
    return names


def render(spec: dict[str, Any]) -> str:
    esc = html.escape
    schemas = spec.get("components", {}).get("schemas", {})
    items = []
    for path, operations in sorted(spec.get("paths", {}).items()):
        for method in _METHODS:
            operation = operations.get(method)
            if operation is None:
                continue
            params = ", ".join(f"<code>{esc(name)}</code>" for name in _parameters(operation, schemas))
            summary = esc(str(operation.get("summary", "")))
            items.append(
                f'<li><span class="m">{method.upper()}</span> <code>{esc(path)}</code> {summary}'
                + (f"<br>parameters: {params}" if params else "")
                + "</li>"
            )
    title = esc(f"{spec.get('info', {}).get('title', '')} {spec.get('info', {}).get('version', '')}")
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a>.</p>'
        f"<ul>{''.join(items)}</ul></body></html>"
    )


def install(app: FastAPI) -> None:
    page: list[str] = []

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        if not page:
            page.append(render(app.openapi()))
        return HTMLResponse(page[0], headers={"Content-Security-Policy": CSP})
