"""The sandbox processor's HTTP face: what the vault's relay delivers card-bearing requests to.

A real processor receives the card number in its authorization request; so does the sandbox, so
that the payment path is the same whichever processor answers: the connector names the vault's
`sandbox.authorize` template and its non-card values, the vault builds the request with the card,
and the sandbox decides by the PAN it received (a declined test card declines only if the relay
really delivered its number). It is reached in-process (an ASGI app behind an httpx transport, no
network), as a local test processor the relay is explicitly configured to allow.

A bare ASGI callable, not a framework app: connectors do not depend on the web framework.

    POST /v1/authorizations  {"idempotency_key", "merchant_id", "amount_minor", "currency",
                              "capture", "livemode", "authentication",
                              "card": {"token", "number", "cvc", "exp_month", "exp_year"}}
    200 {"outcome", "processor_ref", "charge_ref", "amount_minor", "currency"}
    402 {"error": {"type": "card_error", "decline_code", "message", "raw_code"}}
    400 invalid request · 503 processor error · 504 simulated timeout
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from strongroom.connectors.base import (
    Authentication,
    CardRef,
    Declined,
    InvalidProcessorRequest,
    ProcessorTimeout,
    ProcessorUnavailable,
)
from strongroom.connectors.sandbox import cards
from strongroom.connectors.sandbox.processor import SandboxProcessor
from strongroom.vault.templates import SANDBOX_AUTHORIZE

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# The vault's sandbox template says where the card-bearing request goes; this face answers there.
AUTHORIZATIONS_PATH = SANDBOX_AUTHORIZE.path
_MAX_BODY = 64 * 1024


class SandboxHttp:
    def __init__(self, processor: SandboxProcessor) -> None:
        self._processor = processor

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (the api's /sandbox)
            path = path[len(root) :]
        if scope["method"] != "POST" or path != AUTHORIZATIONS_PATH:
            await _answer(send, 404, {"error": {"type": "invalid_request", "message": "Not found."}})
            return
        try:
            data = orjson.loads(await _body(receive))
            status, payload = await self._authorize(data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            status, payload = 400, {"error": {"type": "invalid_request", "message": f"Malformed request: {exc}"}}
        await _answer(send, status, payload)

    async def _authorize(self, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        card = data["card"]
        number = str(card["number"])
        if not number.isdigit() or not cards.luhn_valid(number):
            return 400, {"error": {"type": "invalid_request", "message": "The card number is not a valid card."}}
        ref = CardRef(
            merchant_id=str(data["merchant_id"]),
            token=str(card["token"]),
            brand=cards.detect_brand(number),
            bin=number[:6],
            last4=number[-4:],
            exp_month=int(card["exp_month"]),
            exp_year=int(card["exp_year"]),
        )
        authentication = data.get("authentication")
        try:
            operation = await self._processor.authorize(
                idempotency_key=str(data["idempotency_key"]),
                merchant_id=ref.merchant_id,
                amount_minor=int(data["amount_minor"]),
                currency=str(data["currency"]),
                capture=bool(data["capture"]),
                card=ref,
                authentication=Authentication(authentication) if authentication else None,
                livemode=bool(data.get("livemode", False)),
            )
        except Declined as exc:
            error = {"type": "card_error", "decline_code": exc.decline_code, "message": exc.message}
            return 402, {"error": error | {"raw_code": exc.raw_code}}
        except ProcessorTimeout as exc:
            return 504, {"error": {"type": "timeout", "message": exc.message, "raw_code": exc.raw_code}}
        except ProcessorUnavailable as exc:
            return 503, {"error": {"type": "api_error", "message": exc.message, "raw_code": exc.raw_code}}
        except InvalidProcessorRequest as exc:
            return 400, {"error": {"type": "invalid_request", "message": exc.message, "raw_code": exc.raw_code}}
        return 200, {
            "outcome": operation.outcome.value,
            "processor_ref": operation.processor_ref,
            "charge_ref": operation.charge_ref,
            "amount_minor": operation.amount_minor,
            "currency": operation.currency,
        }


async def _body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > _MAX_BODY:
            raise ValueError("request body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
