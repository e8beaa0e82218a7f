"""`SandboxConnector`: the `Connector` for the built-in sandbox processor.

Stateless, like every connector: it translates Strongroom's requests into the processor's
calls and the processor's records into Strongroom's results. The processor raises the
closed set of errors from `connectors.base` itself, so they pass through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from strongroom.connectors.base import (
    Authorization,
    AuthorizationStatus,
    AuthorizeRequest,
    CaptureRequest,
    Declined,
    InvalidProcessorRequest,
    ProcessorResult,
    ProcessorTimeout,
    ProcessorUnavailable,
    RefundRequest,
    VoidRequest,
)
from strongroom.connectors.sandbox.processor import (
    OperationKind,
    Outcome,
    SandboxOperation,
    SandboxProcessor,
    declined_error,
)
from strongroom.vault.relay import CardFacts, CardRelay, RelayCall, RelayFailed
from strongroom.vault.templates import SANDBOX_AUTHORIZE, SANDBOX_ORIGIN

if TYPE_CHECKING:
    from strongroom.connectors.base import Connector

_STATUS = {
    Outcome.AUTHORIZED: AuthorizationStatus.AUTHORIZED,
    Outcome.CAPTURED: AuthorizationStatus.CAPTURED,
    Outcome.REQUIRES_ACTION: AuthorizationStatus.REQUIRES_ACTION,
}

__all__ = ["SANDBOX_ORIGIN", "SandboxConnector"]  # SANDBOX_ORIGIN: the app wires the relay with it


class SandboxConnector:
    name = "sandbox"

    def __init__(self, processor: SandboxProcessor, relay: CardRelay | None = None, url: str = SANDBOX_ORIGIN) -> None:
        self._processor = processor
        self._relay = relay
        # In-process by default; the api's /sandbox mount when the vault runs as its own process.
        # The vault accepts only the endpoints its sandbox template lists.
        self._url = url

    async def authorize(self, request: AuthorizeRequest) -> Authorization:
        """Through the vault's relay: this connector never sees the card number it sends. (The
        application always wires the relay; the processor-level tests, which have no vault, call
        the processor directly and it decides by the CardRef's BIN and last 4.)"""
        if self._relay is None:
            return _authorization(
                await self._processor.authorize(
                    idempotency_key=request.idempotency_key,
                    merchant_id=request.merchant_id,
                    amount_minor=request.amount_minor,
                    currency=request.currency,
                    capture=request.capture,
                    card=request.card,
                    authentication=request.authentication,
                    livemode=request.livemode,
                )
            )
        # The non-card half of the request; the vault's template puts the card into `card.*`.
        values = {
            "idempotency_key": request.idempotency_key,
            "merchant_id": request.merchant_id,
            "amount_minor": request.amount_minor,
            "currency": request.currency,
            "capture": request.capture,
            "livemode": request.livemode,
            "authentication": request.authentication.value if request.authentication else None,
            "card.token": request.card.token,
        }
        try:
            response = await self._relay.send(
                actor=f"connector:{self.name}",
                merchant_id=request.merchant_id,
                token=request.card.token,
                card=CardFacts(request.card.exp_month, request.card.exp_year),
                call=RelayCall(SANDBOX_AUTHORIZE.id, values, base_url=self._url),
            )
        except RelayFailed as exc:
            if exc.timed_out:
                raise ProcessorTimeout(str(exc), raw_code="timeout") from exc
            raise ProcessorUnavailable(str(exc), raw_code="connection_error") from exc
        return _answer(response.status_code, orjson.loads(response.body))

    async def capture(self, request: CaptureRequest) -> ProcessorResult:
        operation = await self._processor.capture(
            idempotency_key=request.idempotency_key,
            charge_ref=request.processor_ref,
            amount_minor=request.amount_minor,
            currency=request.currency,
        )
        return ProcessorResult(processor_ref=operation.processor_ref, amount_minor=operation.amount_minor)

    async def void(self, request: VoidRequest) -> ProcessorResult:
        operation = await self._processor.void(
            idempotency_key=request.idempotency_key, charge_ref=request.processor_ref
        )
        return ProcessorResult(processor_ref=operation.processor_ref, amount_minor=operation.amount_minor)

    async def refund(self, request: RefundRequest) -> ProcessorResult:
        operation = await self._processor.refund(
            idempotency_key=request.idempotency_key,
            charge_ref=request.processor_ref,
            amount_minor=request.amount_minor,
            currency=request.currency,
        )
        return ProcessorResult(processor_ref=operation.processor_ref, amount_minor=operation.amount_minor)

    async def fetch_status(self, idempotency_key: str) -> Authorization | None:
        """The recorded outcome of the authorization with this key, as it was first answered."""
        operation = await self._processor.fetch_status(idempotency_key)
        if operation is None:
            return None
        if operation.kind is not OperationKind.AUTHORIZE:
            raise InvalidProcessorRequest(f"Key {idempotency_key!r} belongs to a {operation.kind}, not an authorize.")
        if operation.outcome is Outcome.DECLINED:
            raise declined_error(operation)
        return _authorization(operation)


def _answer(status_code: int, payload: dict[str, Any]) -> Authorization:
    if status_code == 200:
        return _authorization_from(
            Outcome(payload["outcome"]),
            payload["processor_ref"],
            payload["charge_ref"],
            payload["amount_minor"],
            payload["currency"],
        )
    error = payload.get("error", {})
    message, raw_code = str(error.get("message", "The sandbox processor refused.")), error.get("raw_code")
    if status_code == 402:
        raise Declined(str(error.get("decline_code") or "generic_decline"), message, raw_code=raw_code)
    if status_code == 504:
        raise ProcessorTimeout(message, raw_code=raw_code)
    if status_code == 400:
        raise InvalidProcessorRequest(message, raw_code=raw_code)
    raise ProcessorUnavailable(message, raw_code=raw_code)


def _authorization(operation: SandboxOperation) -> Authorization:
    return _authorization_from(
        operation.outcome, operation.processor_ref, operation.charge_ref, operation.amount_minor, operation.currency
    )


def _authorization_from(
    outcome: Outcome, processor_ref: str, charge_ref: str, amount_minor: int, currency: str
) -> Authorization:
    status = _STATUS[outcome]
    return Authorization(
        status=status,
        processor_ref=processor_ref,
        amount_minor=amount_minor,
        currency=currency,
        # Stripe's charge.outcome.network_status: a payment awaiting 3-D Secure has not been sent.
        network_status=(
            "not_sent_to_network" if status is AuthorizationStatus.REQUIRES_ACTION else "approved_by_network"
        ),
        raw={"outcome": outcome.value, "charge_ref": charge_ref},
    )


if TYPE_CHECKING:

    def _conforms(connector: SandboxConnector) -> Connector:
        return connector  # mypy checks SandboxConnector against the Connector protocol here
