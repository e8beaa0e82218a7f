"""Exception types every domain raises; `strongroom.api.errors` renders them as Stripe-shaped JSON.

The fields follow Stripe's error object (https://docs.stripe.com/api/errors): `type`, `code`,
`decline_code`, `param`, `message`. Domains raise these with structured fields; only the HTTP
layer decides how they look on the wire.
"""

from __future__ import annotations

from typing import Any

from strongroom.redact import redact


class InvariantError(Exception):
    """A broken internal invariant (debits != credits, refund > captured). Never caught: a bug."""


class StrongroomError(Exception):
    """A request that cannot be honoured, with Stripe's error fields."""

    http_status = 400
    type = "invalid_request_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        # PCI DSS 3.4.1: a message or parameter name may echo client input, which may hold a PAN.
        message = redact(message)
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = redact(param) if param is not None else None
        self.decline_code = decline_code
        self.extra = extra or {}

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            body["code"] = self.code
        if self.param is not None:
            body["param"] = self.param
        if self.decline_code is not None:
            body["decline_code"] = self.decline_code
        body.update(self.extra)
        return body


class InvalidRequest(StrongroomError):
    """400: the parameters are wrong; nothing was changed."""

    default_code = "parameter_invalid"


class UnknownParameter(InvalidRequest):
    default_code = "parameter_unknown"

    def __init__(self, param: str) -> None:
        super().__init__(f"Received unknown parameter: {param}", param=param)


class MissingParameter(InvalidRequest):
    default_code = "parameter_missing"

    def __init__(self, param: str) -> None:
        super().__init__(f"Missing required param: {param}.", param=param)


class UnexpectedState(InvalidRequest):
    """400: the object is not in a state that allows this operation (Stripe's *_unexpected_state)."""

    default_code = "payment_intent_unexpected_state"


class ResourceMissing(StrongroomError):
    http_status = 404
    default_code = "resource_missing"

    def __init__(self, kind: str, object_id: str, *, param: str | None = "id") -> None:
        super().__init__(f"No such {kind}: '{object_id}'", param=param)


class AuthenticationFailed(StrongroomError):
    http_status = 401
    default_code = "api_key_invalid"

    def __init__(self, message: str = "Invalid API Key provided.") -> None:
        super().__init__(message)


class PermissionDenied(StrongroomError):
    http_status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class CardError(StrongroomError):
    """402: the card was declined or could not be processed."""

    http_status = 402
    type = "card_error"
    default_code = "card_declined"


class IdempotencyError(StrongroomError):
    """400: the Idempotency-Key was reused with different parameters (Stripe's idempotency_error)."""

    type = "idempotency_error"
    default_code = "idempotency_key_in_use"


class IdempotencyConflict(StrongroomError):
    """409: a request with this Idempotency-Key is still being processed."""

    http_status = 409
    type = "idempotency_error"
    default_code = "idempotency_key_in_use"


class PayloadTooLarge(StrongroomError):
    http_status = 413
    default_code = "payload_too_large"


class RateLimited(StrongroomError):
    http_status = 429
    type = "rate_limit_error"
    default_code = "rate_limit"


class ObjectLocked(StrongroomError):
    """409: another request is changing this object right now (Stripe's `lock_timeout`)."""

    http_status = 409
    default_code = "lock_timeout"


class ProcessorFailure(StrongroomError):
    """502: the processor failed in a way that is not the card's fault; safe to retry."""

    http_status = 502
    type = "api_error"
    default_code = "processor_unavailable"


class Overloaded(StrongroomError):
    """503: shed before doing any work; safe to retry after `Retry-After`."""

    http_status = 503
    type = "api_error"
    default_code = "overloaded"

    def __init__(self) -> None:
        super().__init__("Strongroom is busy: the request was not processed. Retry shortly.")
