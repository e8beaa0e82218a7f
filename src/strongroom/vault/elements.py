"""The hosted card form: short-lived sessions, the page and its security headers.

A merchant's server creates a session with its secret key, naming the one origin allowed to embed
the form. The customer's browser loads the form from the vault in an iframe and posts the card to
the vault itself, authorized by the session's client secret: the card never touches the embedding
page, which receives only the payment method's id through `postMessage` (PCI DSS SAQ A scope).

The client secret is the session sealed with AES-256-GCM under a key derived from a configured
server secret, its id as additional data, so any API process can open it without a lookup. What
a session has been used for is stored, though: it creates at most `card_form.session_max_uses`
payment methods (one by default), so a client secret copied off the merchant's page is no tool
for testing stolen cards. A submission must also come from the form itself or from the origin
the merchant named (`Origin`, else `Referer`), and it is rate limited per IP and per session.
"""

from __future__ import annotations

import base64
import binascii
import html
import re
import secrets
from dataclasses import dataclass
from functools import cache
from importlib import resources
from urllib.parse import urlsplit

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strongroom.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from strongroom.ids import random_part
from strongroom.sensitive import Secret

SESSION_TTL_S = 15 * 60
SESSION_PREFIX = "elements_session_"
# What keys the session seal: derived from the API key-hash secret with its own label.
KEY_LABEL = "strongroom/vault/elements-session/v1"
_NONCE_BYTES = 12
_SECRET_SEPARATOR = "_secret_"  # noqa: S105 (a separator, not a secret)
_SESSION_ID_RE = re.compile(re.escape(SESSION_PREFIX) + r"[0-9A-Za-z]{24}")
_CLIENT_SECRET_MAX = 1024
# A serialized origin (RFC 6454 §6.2): scheme, host and optional port, nothing else. Only these
# characters can reach the CSP header, so a value cannot add a directive or another source.
_ORIGIN_RE = re.compile(r"(https?)://([a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?)(?::([1-9][0-9]{0,4}))?")
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1"})

STATIC_TYPES = {"card.js": "text/javascript; charset=utf-8", "card.css": "text/css; charset=utf-8"}


@dataclass(frozen=True)
class Session:
    id: str
    merchant_id: str
    livemode: bool
    allowed_origin: str
    expires_at: int

    def expired(self, now_s: float) -> bool:
        return now_s >= self.expires_at


class SessionSealer:
    """Seals sessions into client secrets and opens them; a changed byte fails to open."""

    def __init__(self, key: Secret[bytes]) -> None:
        self._aead = AESGCM(key.reveal())

    def new(self, merchant_id: str, livemode: bool, allowed_origin: str, now_s: float) -> tuple[Session, str]:
        session = Session(
            id=SESSION_PREFIX + random_part(),
            merchant_id=merchant_id,
            livemode=livemode,
            allowed_origin=allowed_origin,
            expires_at=int(now_s) + SESSION_TTL_S,
        )
        return session, self.seal(session)

    def seal(self, session: Session) -> str:
        payload = orjson.dumps(
            {"m": session.merchant_id, "l": session.livemode, "o": session.allowed_origin, "e": session.expires_at}
        )
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, payload, session.id.encode())
        return session.id + _SECRET_SEPARATOR + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, client_secret: str) -> Session:
        """The session a client secret names, expired or not (the caller decides what expiry means)."""
        session_id, _, sealed_b64 = client_secret.partition(_SECRET_SEPARATOR)
        if len(client_secret) > _CLIENT_SECRET_MAX or not _SESSION_ID_RE.fullmatch(session_id):
            raise _invalid()
        try:
            sealed = base64.urlsafe_b64decode(sealed_b64 + "=" * (-len(sealed_b64) % 4))
            payload = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], session_id.encode())
        except (binascii.Error, ValueError, InvalidTag):
            raise _invalid() from None
        fields = orjson.loads(payload)
        return Session(session_id, fields["m"], fields["l"], fields["o"], fields["e"])


def _invalid() -> AuthenticationFailed:
    return AuthenticationFailed("Invalid card form session: create a new one with POST /v1/elements/sessions.")


def expired_error() -> InvalidRequest:
    return InvalidRequest(
        "This card form has expired. Reload the page to enter your card again.", code="elements_session_expired"
    )


def allowed_origin(value: str, *, livemode: bool) -> str:
    """The origin a merchant names for embedding, checked to be exactly one serialized origin."""
    match = _ORIGIN_RE.fullmatch(value)
    if match is None or (match.group(3) is not None and int(match.group(3)) > 65535):
        raise InvalidRequest(
            "Invalid allowed_origin: give one origin such as https://shop.example (scheme, host and optional "
            "port; lowercase; no path).",
            param="allowed_origin",
        )
    if livemode and match.group(1) != "https" and match.group(2) not in _LOOPBACK_HOSTS:
        raise InvalidRequest("allowed_origin must use https in live mode.", param="allowed_origin")
    return value


def origin_of(url: str) -> str | None:
    """The serialized origin (RFC 6454 §6.2) of an absolute http(s) URL; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default_port = 443 if parts.scheme == "https" else 80
    suffix = f":{port}" if port is not None and port != default_port else ""
    return f"{parts.scheme}://{parts.hostname}{suffix}"


def check_submitter(session: Session, form_origin: str | None, origin: str | None, referer: str | None) -> None:
    """A submission must come from the form's own page (its script posts same-origin) or from the
    origin the merchant named. Browsers send `Origin` on every POST; `Referer` stands in where a
    proxy stripped it. Neither, or `Origin: null` (a sandboxed or privacy-redirected page), is
    refused: a page elsewhere must not be able to drive a customer's browser through the form."""
    sent = origin_of(origin) if origin is not None else origin_of(referer) if referer is not None else None
    if sent is None or sent not in (form_origin, session.allowed_origin):
        raise PermissionDenied(
            "This card form accepts cards only from its own page.", code="elements_origin_not_allowed"
        )


def security_headers(frame_origin: str | None) -> dict[str, str]:
    """Headers of every response of the form. `frame_origin` None: no page may frame it."""
    ancestors = frame_origin if frame_origin is not None else "'none'"
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            f"form-action 'none'; frame-ancestors {ancestors}; base-uri 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        # Only pages and scripts of this origin may load the form's script and style.
        "Cross-Origin-Resource-Policy": "same-origin",
    }


def card_page(session: Session) -> str:
    return _static_text("card.html").replace("{{allowed_origin}}", html.escape(session.allowed_origin, quote=True))


def message_page(message: str) -> str:
    """The page shown instead of the form (expired or invalid session): text only, no script."""
    return _static_text("message.html").replace("{{message}}", html.escape(message, quote=True))


@cache
def static_file(name: str) -> bytes:
    """card.js and card.css, read once from the package."""
    if name not in STATIC_TYPES:
        raise KeyError(name)
    return (resources.files("strongroom.vault") / "static" / name).read_bytes()


@cache
def _static_text(name: str) -> str:
    return (resources.files("strongroom.vault") / "static" / name).read_text(encoding="utf-8")
