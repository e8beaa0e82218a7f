"""The sandbox's test cards: Stripe's published test numbers (https://docs.stripe.com/testing)
plus two Strongroom-specific ones, and the card-number checks the payment-methods code uses.

The processor never sees a full card number (the vault keeps it), so an outcome is looked up
by the non-sensitive pair a `CardRef` carries: the BIN (first 6 digits) and the last 4. Two
numbers sharing that pair share an outcome; `_index` refuses such a collision inside this
table, but numbers outside it can still match (Stripe's Brazil card 4000 0007 6000 0002 shares
400000/0002 with the generic decline, so here it declines). Any card not in the table
succeeds: Luhn and length checks belong to whoever holds the full number (`luhn_valid`,
`detect_brand`), not to the processor.

Strongroom-specific cards (Luhn-valid, not published by Stripe):
- 4000 0000 0000 0408 (408 = HTTP Request Timeout): the processor call times out. Nothing is
  recorded, so `fetch_status` answers None; it times out on every retry too.
- 4000 0000 0000 5035 ("503" = Service Unavailable): the processor answers with an error of its
  own (`ProcessorUnavailable`); nothing is recorded.

3-D Secure: 4000 0025 0000 3155 needs authentication. Without it the processor answers
`requires_action`; after a failed authentication it declines with decline code
`authentication_failure` (Stripe reports this as the error code
`payment_intent_authentication_failure`, which we keep as the raw code).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from strongroom.errors import InvariantError


class Behaviour(StrEnum):
    SUCCEED = "succeed"
    DECLINE = "decline"
    REQUIRE_3DS = "require_3ds"
    TIME_OUT = "time_out"  # Strongroom-specific: no answer
    FAIL = "fail"  # Strongroom-specific: the processor's own error


@dataclass(frozen=True)
class Decline:
    decline_code: str
    # Stripe's error `code` for this decline (card_declined, expired_card, …): kept as raw_code.
    error_code: str
    message: str


@dataclass(frozen=True)
class SandboxCard:
    number: str
    behaviour: Behaviour = Behaviour.SUCCEED
    funding: str = "credit"
    decline: Decline | None = None

    @property
    def bin(self) -> str:
        return self.number[:6]

    @property
    def last4(self) -> str:
        return self.number[-4:]


def _decline(number: str, decline_code: str, error_code: str, message: str) -> SandboxCard:
    return SandboxCard(number, Behaviour.DECLINE, decline=Decline(decline_code, error_code, message))


DECLINED_MESSAGE = "Your card was declined."

TEST_CARDS: tuple[SandboxCard, ...] = (
    # Successful payments by brand.
    SandboxCard("4242424242424242"),
    SandboxCard("4000056655665556", funding="debit"),
    SandboxCard("5555555555554444"),
    SandboxCard("2223003122003222"),
    SandboxCard("5200828282828210", funding="debit"),
    SandboxCard("5105105105105100", funding="prepaid"),
    SandboxCard("378282246310005"),
    SandboxCard("371449635398431"),
    SandboxCard("6011111111111117"),
    SandboxCard("6011981111111113", funding="debit"),
    SandboxCard("3056930009020004"),
    SandboxCard("36227206271667"),
    SandboxCard("3566002020360505"),
    SandboxCard("6200000000000005"),
    # Declines.
    _decline("4000000000000002", "generic_decline", "card_declined", DECLINED_MESSAGE),
    _decline("4000000000009995", "insufficient_funds", "card_declined", "Your card has insufficient funds."),
    _decline("4000000000009987", "lost_card", "card_declined", DECLINED_MESSAGE),
    _decline("4000000000009979", "stolen_card", "card_declined", DECLINED_MESSAGE),
    _decline("4000000000000069", "expired_card", "expired_card", "Your card has expired."),
    _decline("4000000000000127", "incorrect_cvc", "incorrect_cvc", "Your card's security code is incorrect."),
    _decline(
        "4000000000000119",
        "processing_error",
        "processing_error",
        "An error occurred while processing your card. Try again in a little bit.",
    ),
    # 3-D Secure required on every payment.
    SandboxCard("4000002500003155", Behaviour.REQUIRE_3DS),
    # Strongroom-specific (see the module docstring).
    SandboxCard("4000000000000408", Behaviour.TIME_OUT),
    SandboxCard("4000000000005035", Behaviour.FAIL),
)

AUTHENTICATION_FAILURE = Decline(
    "authentication_failure",
    "payment_intent_authentication_failure",
    "The provided payment method has failed authentication.",
)

_SUCCESS = SandboxCard("")


def _index(cards: Iterable[SandboxCard]) -> dict[tuple[str, str], SandboxCard]:
    index: dict[tuple[str, str], SandboxCard] = {}
    for card in cards:
        key = (card.bin, card.last4)
        # The processor only sees BIN + last 4: two entries sharing them would be ambiguous.
        if key in index:
            raise InvariantError(f"test cards {index[key].number} and {card.number} share BIN and last 4")
        index[key] = card
    return index


_BY_BIN_LAST4 = _index(TEST_CARDS)
_BY_NUMBER = {card.number: card for card in TEST_CARDS}


def card_for(bin_: str, last4: str) -> SandboxCard:
    """The test card with this BIN and last 4; an always-succeeding card for any other pair."""
    return _BY_BIN_LAST4.get((bin_, last4), _SUCCESS)


def luhn_valid(number: str) -> bool:
    """The Luhn (mod 10) checksum of ISO/IEC 7812-1, Annex B. Checks digits only, not length."""
    if len(number) < 2 or not number.isascii() or not number.isdigit():
        return False
    return _luhn_sum(number) % 10 == 0


def luhn_check_digit(payload: str) -> str:
    """The digit that makes `payload + digit` pass `luhn_valid`."""
    return str((10 - _luhn_sum(payload + "0") % 10) % 10)


def _luhn_sum(number: str) -> int:
    total = 0
    # Every second digit from the right (the check digit is position 0) is doubled.
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total


# (prefix length, first, last, brand): IIN ranges; disjoint, so order does not matter.
_IIN_RANGES: tuple[tuple[int, int, int, str], ...] = (
    (1, 4, 4, "visa"),
    (2, 51, 55, "mastercard"),
    (4, 2221, 2720, "mastercard"),
    (2, 34, 34, "amex"),
    (2, 37, 37, "amex"),
    (4, 6011, 6011, "discover"),
    (3, 644, 649, "discover"),
    (2, 65, 65, "discover"),
    (3, 300, 305, "diners"),
    (2, 36, 36, "diners"),
    (2, 38, 39, "diners"),
    (4, 3528, 3589, "jcb"),
    (2, 62, 62, "unionpay"),
)


def detect_brand(number: str) -> str:
    """Stripe's brand string for a card number, from its IIN prefix; "unknown" if none fits."""
    if not number.isascii() or not number.isdigit():
        return "unknown"
    for length, first, last, brand in _IIN_RANGES:
        if len(number) >= length and first <= int(number[:length]) <= last:
            return brand
    return "unknown"


def funding_for(number: str) -> str:
    """Stripe's funding type: the test table's, "credit" for other valid numbers, else "unknown"."""
    card = _BY_NUMBER.get(number)
    if card is not None:
        return card.funding
    if not luhn_valid(number) or detect_brand(number) == "unknown":
        return "unknown"
    return "credit"
