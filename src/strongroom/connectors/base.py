"""The interface every processor connector implements, and the closed set of processor errors.

A connector never receives a card number: it gets a `CardRef` (the vault token plus the
non-sensitive card facts). Every call carries a processor-side idempotency key derived
deterministically by the caller, so a retried or recovered call can never move money twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


@dataclass(frozen=True)
class CardRef:
    merchant_id: str
    token: str
    brand: str
    bin: str
    last4: str
    exp_month: int
    exp_year: int


class AuthorizationStatus(StrEnum):
    AUTHORIZED = "authorized"  # funds held; capture later
    CAPTURED = "captured"  # authorized and captured in one step
    REQUIRES_ACTION = "requires_action"  # cardholder authentication (3-D Secure) needed


class Authentication(StrEnum):
    """Outcome of a cardholder authentication (3-D Secure) the customer went through."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class AuthorizeRequest:
    idempotency_key: str
    merchant_id: str
    amount_minor: int
    currency: str
    capture: bool
    card: CardRef
    livemode: bool = False
    authentication: Authentication | None = None


@dataclass(frozen=True)
class Authorization:
    status: AuthorizationStatus
    processor_ref: str
    amount_minor: int
    currency: str
    network_status: str = "approved_by_network"
    raw: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CaptureRequest:
    idempotency_key: str
    processor_ref: str
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class VoidRequest:
    idempotency_key: str
    processor_ref: str


@dataclass(frozen=True)
class RefundRequest:
    idempotency_key: str
    processor_ref: str
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class ProcessorResult:
    """Outcome of capture, void or refund: the processor's reference for that operation."""

    processor_ref: str
    amount_minor: int


class ProcessorError(Exception):
    """Base of the closed set of processor outcomes that are not a success."""

    def __init__(self, message: str, *, raw_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.raw_code = raw_code


class Declined(ProcessorError):
    """The issuer or processor refused; definitive, nothing was moved."""

    def __init__(self, decline_code: str, message: str, *, raw_code: str | None = None) -> None:
        super().__init__(message, raw_code=raw_code)
        self.decline_code = decline_code


class ProcessorUnavailable(ProcessorError):
    """The processor answered with an error of its own; definitive, nothing was moved."""


class ProcessorTimeout(ProcessorError):
    """No answer in time: the outcome is unknown and must be resolved with `fetch_status`."""


class InvalidProcessorRequest(ProcessorError):
    """The processor rejected the request as malformed (a bug or a configuration problem)."""


class ProcessorAuthenticationFailed(ProcessorError):
    """Our credentials were refused by the processor."""


class Connector(Protocol):
    name: str

    async def authorize(self, request: AuthorizeRequest) -> Authorization: ...

    async def capture(self, request: CaptureRequest) -> ProcessorResult: ...

    async def void(self, request: VoidRequest) -> ProcessorResult: ...

    async def refund(self, request: RefundRequest) -> ProcessorResult: ...

    async def fetch_status(self, idempotency_key: str) -> Authorization | None:
        """The outcome of an earlier `authorize` with this key; None if the processor never saw it.

        Raises the same `Declined` a decline raised the first time.
        """
