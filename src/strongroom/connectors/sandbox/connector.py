"""`SandboxConnector`: the `Connector` for the built-in sandbox processor.

Stateless, like every connector: it translates Strongroom's requests into the processor's
calls and the processor's records into Strongroom's results. The processor raises the
closed set of errors from `connectors.base` itself, so they pass through unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from strongroom.connectors.base import (
    Authorization,
    AuthorizationStatus,
    AuthorizeRequest,
    CaptureRequest,
    InvalidProcessorRequest,
    ProcessorResult,
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

if TYPE_CHECKING:
    from strongroom.connectors.base import Connector

_STATUS = {
    Outcome.AUTHORIZED: AuthorizationStatus.AUTHORIZED,
    Outcome.CAPTURED: AuthorizationStatus.CAPTURED,
    Outcome.REQUIRES_ACTION: AuthorizationStatus.REQUIRES_ACTION,
}


class SandboxConnector:
    name = "sandbox"

    def __init__(self, processor: SandboxProcessor) -> None:
        self._processor = processor

    async def authorize(self, request: AuthorizeRequest) -> Authorization:
        operation = await self._processor.authorize(
            idempotency_key=request.idempotency_key,
            merchant_id=request.merchant_id,
            amount_minor=request.amount_minor,
            currency=request.currency,
            capture=request.capture,
            card=request.card,
            authentication=request.authentication,
            livemode=request.livemode,
        )
        return _authorization(operation)

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


def _authorization(operation: SandboxOperation) -> Authorization:
    status = _STATUS[operation.outcome]
    return Authorization(
        status=status,
        processor_ref=operation.processor_ref,
        amount_minor=operation.amount_minor,
        currency=operation.currency,
        # Stripe's charge.outcome.network_status: a payment awaiting 3-D Secure has not been sent.
        network_status=(
            "not_sent_to_network" if status is AuthorizationStatus.REQUIRES_ACTION else "approved_by_network"
        ),
        raw={"outcome": operation.outcome.value, "charge_ref": operation.charge_ref},
    )


if TYPE_CHECKING:

    def _conforms(connector: SandboxConnector) -> Connector:
        return connector  # mypy checks SandboxConnector against the Connector protocol here
