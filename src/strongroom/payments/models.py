"""The payment intent state machine, as Stripe documents it.

requires_payment_method → requires_confirmation → requires_action → processing →
requires_capture → succeeded | canceled. An operation not allowed in the current status is a
400 `payment_intent_unexpected_state` and changes nothing.
"""

from __future__ import annotations

from enum import StrEnum

from strongroom.errors import UnexpectedState


class IntentStatus(StrEnum):
    REQUIRES_PAYMENT_METHOD = "requires_payment_method"
    REQUIRES_CONFIRMATION = "requires_confirmation"
    REQUIRES_ACTION = "requires_action"
    PROCESSING = "processing"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    CANCELED = "canceled"


class Operation(StrEnum):
    UPDATE = "update"
    CONFIRM = "confirm"
    CAPTURE = "capture"
    CANCEL = "cancel"
    REFUND = "refund"


S = IntentStatus
ALLOWED: dict[Operation, frozenset[IntentStatus]] = {
    Operation.UPDATE: frozenset({S.REQUIRES_PAYMENT_METHOD, S.REQUIRES_CONFIRMATION, S.REQUIRES_ACTION}),
    Operation.CONFIRM: frozenset({S.REQUIRES_PAYMENT_METHOD, S.REQUIRES_CONFIRMATION}),
    Operation.CAPTURE: frozenset({S.REQUIRES_CAPTURE}),
    Operation.CANCEL: frozenset(
        {S.REQUIRES_PAYMENT_METHOD, S.REQUIRES_CONFIRMATION, S.REQUIRES_ACTION, S.REQUIRES_CAPTURE}
    ),
    Operation.REFUND: frozenset({S.SUCCEEDED}),
}

_VERB = {
    Operation.UPDATE: "update",
    Operation.CONFIRM: "confirm",
    Operation.CAPTURE: "capture",
    Operation.CANCEL: "cancel",
    Operation.REFUND: "refund",
}


def check_allowed(operation: Operation, status: str, intent_id: str) -> None:
    if IntentStatus(status) not in ALLOWED[operation]:
        raise UnexpectedState(
            f"You cannot {_VERB[operation]} this PaymentIntent because it has a status of {status}."
            f" (PaymentIntent {intent_id})",
            code="payment_intent_unexpected_state",
        )


class CaptureMethod(StrEnum):
    AUTOMATIC = "automatic"
    AUTOMATIC_ASYNC = "automatic_async"
    MANUAL = "manual"


CANCELLATION_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer", "abandoned"})
REFUND_REASONS = frozenset({"duplicate", "fraudulent", "requested_by_customer"})

# Stripe's messages for its decline codes (https://docs.stripe.com/declines/codes).
DECLINE_MESSAGES = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "lost_card": "Your card was declined.",
    "stolen_card": "Your card was declined.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "processing_error": "An error occurred while processing your card. Try again in a little bit.",
    "authentication_failure": "We are unable to authenticate your payment method.",
}

# Decline codes that Stripe reports under a more specific top-level `code`.
DECLINE_TOP_CODES = {
    "expired_card": "expired_card",
    "incorrect_cvc": "incorrect_cvc",
    "processing_error": "processing_error",
}
