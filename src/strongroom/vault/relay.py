"""The relay: how a card number reaches a processor without leaving the vault's hands.

A connector never holds a PAN. For a card-bearing call it names one of the vault's request
templates (`strongroom.vault.templates`: method, path, encoding, which field each card value
fills, which headers the caller may set) and supplies the non-card values, with the card's token.
The vault then, and only then:

1. resolves the template and the endpoint (one of the template's base URLs) and checks the origin
   against the allowlist (exact scheme, host and port; HTTPS only, except origins explicitly
   configured as local test processors, such as the in-process sandbox),
2. checks the caller's values and headers against the template (no field outside it, no card
   field, no `{{…}}` placeholder anywhere: SECURITY.md T2),
3. opens the card (`Vault.reveal`) and takes the CVC out of its in-memory cache (it is gone
   afterwards: PCI DSS 3.3.1.2),
4. builds the request itself, each card value in its one field, and sends it,
5. redacts any card data in the processor's answer before returning it (the PAN and anything that
   looks like one, and the CVC),
6. audits the use (SECURITY.md T2 / P18, P19): actor, merchant, token, destination, method, path,
   outcome (sent, refused, template_refused, not_found, timeout, error), status, UTC time —
   never the card data.

A refusal (steps 1 and 2) raises `RelayRefused` (`TemplateRefused` for step 2) and is audited too;
the card is not opened and nothing is sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import structlog

from strongroom.errors import ResourceMissing
from strongroom.ids import ordered_part
from strongroom.redact import redact
from strongroom.store.db import Database, utcnow
from strongroom.store.group import GroupCommit, Write
from strongroom.vault.relay_tables import vault_relay_audit
from strongroom.vault.service import Vault
from strongroom.vault.templates import RelayRefused, TemplateRefused, TemplateRegistry, card_values, default_registry

# RelayRefused and TemplateRefused are raised here and defined beside the templates.
__all__ = [
    "Allowlist",
    "CardFacts",
    "CardRelay",
    "Relay",
    "RelayCall",
    "RelayFailed",
    "RelayRefused",
    "RelayResponse",
    "TemplateRefused",
    "origin_of",
]

log = structlog.get_logger(__name__)

_INSERT_AUDIT = vault_relay_audit.insert()


class RelayFailed(Exception):
    """The request was sent (or attempted) but no answer came back; `timed_out` tells which."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


@dataclass(frozen=True)
class CardFacts:
    """What the caller already knows about the card and may have filled in: non-sensitive."""

    exp_month: int
    exp_year: int


@dataclass(frozen=True)
class RelayCall:
    """What the caller may say about a card-bearing request: which template, which of its
    endpoints (None: its default), and the non-card values and headers the template allows."""

    template: str
    values: Mapping[str, object]
    headers: Mapping[str, object] = field(default_factory=dict)
    base_url: str | None = None
    # Keys a request over the vault's channel carried beyond these (e.g. a raw body): refused.
    unexpected: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> RelayCall:
        """From the vault channel's JSON; never raises, so that a malformed call is refused and
        audited by the relay like any other."""
        base_url = data.get("base_url")
        return cls(
            template=str(data.get("template") or "")[:100],
            values=data.get("values", {}),  # its shape is checked by the template, with the rest
            headers=data.get("headers", {}),
            base_url=base_url if isinstance(base_url, str) else None,
            unexpected=tuple(sorted(str(k)[:40] for k in data if k not in _CALL_KEYS)),
        )

    def as_wire(self) -> dict[str, Any]:
        return {"template": self.template, "values": self.values, "headers": self.headers, "base_url": self.base_url}


_CALL_KEYS = frozenset({"template", "values", "headers", "base_url"})


@dataclass(frozen=True)
class RelayResponse:
    status_code: int
    body: str  # card data redacted
    headers: Mapping[str, str]


class CardRelay(Protocol):
    """What a connector needs of the relay: `Relay` in-process, `RemoteRelay` across the
    channel to a vault running as its own process."""

    async def send(
        self, *, actor: str, merchant_id: str, token: str, card: CardFacts, call: RelayCall
    ) -> RelayResponse:
        """Build the template's request with the card, send it to an allowlisted processor,
        return the redacted answer."""

    async def aclose(self) -> None:
        """Release connections."""


def origin_of(url: str) -> str:
    """`https://api.example.com/v1/x` → `https://api.example.com:443` (explicit port)."""
    parts = urllib.parse.urlsplit(url)
    if parts.username or parts.password:
        raise RelayRefused("Relay destinations cannot carry credentials in the URL.")
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise RelayRefused("Relay destinations must be absolute http(s) URLs.")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname.lower()}:{port}"


class Allowlist:
    def __init__(self, https_origins: Sequence[str], local_test_origins: Sequence[str] = ()) -> None:
        self._allowed = {origin_of(o) for o in https_origins}
        if any(not o.startswith("https://") for o in self._allowed):
            raise ValueError("relay_allowlist takes https:// origins only; plain HTTP is for local test processors")
        self._allowed |= {origin_of(o) for o in local_test_origins}

    def check(self, url: str) -> str:
        origin = origin_of(url)
        if origin not in self._allowed:
            raise RelayRefused(f"The relay does not send card data to {origin}: it is not on the allowlist.")
        return origin


class Relay:
    def __init__(
        self,
        vault: Vault,
        db: Database,
        allowlist: Allowlist,
        *,
        timeout_s: float,
        local_apps: Mapping[str, AsgiApp] | None = None,
        templates: TemplateRegistry | None = None,
        group_commit_max: int = 64,
        group_commit_turns: int = 0,
    ) -> None:
        self._vault = vault
        self._db = db
        self._commits = GroupCommit(db, max_batch=group_commit_max, max_writers=1, gather_turns=group_commit_turns)
        self._allowlist = allowlist
        self._templates = templates or default_registry()
        # (template, base URL) → (URL, origin) once resolved and allowed: endpoints are few and
        # fixed at start-up, so the hot path skips the URL parsing.
        self._resolved: dict[tuple[str, str | None], tuple[str, str]] = {}
        self._timeout_s = timeout_s
        # Local test processors reached in-process (an ASGI app, no network); all else over TLS.
        self._local = {origin_of(o): app for o, app in (local_apps or {}).items()}
        self._network = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), verify=True, follow_redirects=False)
        # httpx logs every request at INFO: one line per payment, and the URL is all it would add
        # to the audit trail.
        logging.getLogger("httpx").setLevel(logging.WARNING)

    async def aclose(self) -> None:
        await self._network.aclose()

    async def send(
        self, *, actor: str, merchant_id: str, token: str, card: CardFacts, call: RelayCall
    ) -> RelayResponse:
        template = self._templates.get(call.template)
        method, path = (template.method, template.path) if template else ("", "")
        destination = f"template:{call.template}"
        try:
            if template is None:
                raise TemplateRefused(f"The vault has no request template {call.template!r}.", param="template")
            key = (template.id, call.base_url)
            resolved = self._resolved.get(key)
            if resolved is None:
                url = self._templates.url(template, call.base_url)
                destination = url
                resolved = self._resolved[key] = (url, self._allowlist.check(url))
            url, destination = resolved
            if call.unexpected:
                raise TemplateRefused("The relay takes a template and values, nothing else.", param=call.unexpected[0])
            prepared = template.prepare(call.values, call.headers)
        except RelayRefused as exc:
            outcome = "template_refused" if isinstance(exc, TemplateRefused) else "refused"
            await self._audit(actor, merchant_id, token, destination[:200], method, path, outcome, None)
            log.warning(
                "vault.relay_refused",
                actor=actor,
                merchant_id=merchant_id,
                template=template.id if template else None,
                param=exc.param,
                reason=exc.message,
            )
            raise
        try:
            pan = await self._vault.reveal_alone(self._db, merchant_id, token)
        except ResourceMissing:
            await self._audit(actor, merchant_id, token, destination, method, path, "not_found", None)
            raise
        cvc = self._vault.cvcs.take(merchant_id, token)
        body = prepared.render(card_values(pan.reveal(), cvc.reveal() if cvc else None, card.exp_month, card.exp_year))
        try:
            # One deadline for the whole exchange (httpx's timeouts are per phase, and an
            # in-process app has none).
            async with asyncio.timeout(self._timeout_s):
                local = self._local.get(destination)
                if local is not None:
                    status, answer_headers, answer = await _call_local(local, method, url, prepared.headers, body)
                else:
                    response = await self._network.request(method, url, content=body, headers=prepared.headers)
                    status, answer_headers, answer = response.status_code, dict(response.headers), response.text
        except (httpx.TimeoutException, TimeoutError) as exc:
            await self._audit(actor, merchant_id, token, destination, method, path, "timeout", None)
            raise RelayFailed(f"no answer from {destination}", timed_out=True) from exc
        except httpx.HTTPError as exc:
            await self._audit(actor, merchant_id, token, destination, method, path, "error", None)
            raise RelayFailed(f"{type(exc).__name__} talking to {destination}", timed_out=False) from exc
        await self._audit(actor, merchant_id, token, destination, method, path, "sent", status)
        secrets_ = [s.reveal() for s in (pan, cvc) if s is not None and s.reveal()]
        return RelayResponse(
            status_code=status,
            body=_scrub(answer, secrets_),
            headers={name: _scrub(value, secrets_) for name, value in answer_headers.items()},
        )

    async def _audit(
        self,
        actor: str,
        merchant_id: str,
        token: str,
        destination: str,
        method: str,
        path: str,
        outcome: str,
        status_code: int | None,
    ) -> None:
        # One append-only row, durable before the answer is returned; committed together with
        # other requests' rows (store.group).
        await self._commits.commit(
            [
                Write(
                    _INSERT_AUDIT,
                    {
                        "merchant_id": merchant_id,
                        "id": "rly_" + ordered_part(),
                        "created": utcnow(),
                        "actor": actor,
                        "token": token,
                        "destination": destination,
                        "method": method.upper()[:10],
                        "path": path,
                        "outcome": outcome,
                        "status_code": status_code,
                    },
                )
            ]
        )


AsgiApp = Callable[
    [MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


async def _call_local(
    app: AsgiApp, method: str, url: str, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, str], str]:
    """One HTTP exchange with an in-process ASGI app, without a client library's machinery (it
    is on every sandbox payment's path): the request in one message, the answer collected."""
    parts = urllib.parse.urlsplit(url)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": parts.scheme,
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "query_string": parts.query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "server": (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)),
        "client": ("127.0.0.1", 0),
    }
    sent = False
    answer: dict[str, Any] = {"status": 500, "headers": [], "body": []}

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = message.get("headers", [])
        elif message["type"] == "http.response.body":
            answer["body"].append(message.get("body", b""))

    await app(scope, receive, send)
    decoded = {k.decode("latin-1"): v.decode("latin-1") for k, v in answer["headers"]}
    return int(answer["status"]), decoded, b"".join(answer["body"]).decode("utf-8", "replace")


def _scrub(text: str, secrets_: Sequence[str]) -> str:
    """The processor's answer without card data: the exact PAN, the CVC where it stands as a
    whole value — quoted, or a form value (an echoed field; a bare number may be an amount) — then
    anything else that looks like a PAN."""
    for value in secrets_:
        if value not in text:
            continue  # nearly always: masking the value costs a Luhn pass for nothing
        if len(value) >= 12:
            text = text.replace(value, redact(value))
        else:  # quoted, also inside an escaped JSON string (a body echoed in a body), or `=…&`
            text = re.sub(rf'(?<=["=]){re.escape(value)}(?=\\?"|&|$)', "***", text)
    return redact(text)
