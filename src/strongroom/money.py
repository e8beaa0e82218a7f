"""Currencies and amounts: money is an `int` of minor units plus a `Currency`, never a float.

The currency list and each currency's minor-unit digits come from ISO 4217 List One as
shipped by the maintained `iso4217` package, not from a hand-typed table. That list holds
only currencies in force, so "active" means "present in the package's table". From it we
drop the codes that are not something a customer can pay in:

* codes whose minor unit ISO gives as "N.A." (metals XAU/XAG/XPD/XPT, bond-market units
  XBA to XBD, XDR, XSU, XUA, the test code XTS and the "no currency" code);
* fund codes: BOV, CHE, CHW, CLF, COU, MXV, USN, UYI and UYW;
* XAD, the Arab Monetary Fund's accounting dinar: a unit of account like XDR, but ISO
  gives it a minor unit, so the "N.A." rule alone would let it through.

Request amounts follow Stripe's API (https://docs.stripe.com/currencies): integers in the
currency's minor unit, lower-case three-letter codes, per-currency minimums and at most
eight digits.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import iso4217

from strongroom.errors import InvalidRequest

# Accounting units for indexation or settlement, not money a card is charged in. ISO's XML
# flags all but UYW with IsFund="true"; UYW (Unidad Previsional, an index unit like UYI) is
# unflagged, which is why this is a list and not a read of the flag.
_FUND_CODES = frozenset({"BOV", "CHE", "CHW", "CLF", "COU", "MXV", "USN", "UYI", "UYW"})

# Units of account that ISO lists with a minor unit, so the "N.A." filter misses them.
_UNIT_OF_ACCOUNT_CODES = frozenset({"XAD"})

# Stripe's "Minimum and maximum charge amounts" table (https://docs.stripe.com/currencies
# #minimum-and-maximum-charge-amounts), in minor units, for the currencies where Stripe
# publishes a minimum. Stripe expresses HUF with two decimals (175.00 Ft), as ISO does.
# BGN is kept because Stripe still lists it, but ISO withdrew it when Bulgaria adopted the
# euro (2026-01-01), so it is not an active currency and this entry is never reached.
STRIPE_MINIMUM_MINOR: dict[str, int] = {
    "usd": 50,
    "aed": 200,
    "aud": 50,
    "bgn": 100,
    "brl": 50,
    "cad": 50,
    "chf": 50,
    "czk": 1500,
    "dkk": 250,
    "eur": 50,
    "gbp": 30,
    "hkd": 400,
    "huf": 17500,
    "inr": 50,
    "jpy": 50,
    "mxn": 1000,
    "myr": 200,
    "nok": 300,
    "nzd": 50,
    "pln": 200,
    "ron": 200,
    "sek": 300,
    "sgd": 50,
    "thb": 1000,
}

# Without a published minimum, the smallest amount is one minor unit.
DEFAULT_MINIMUM_MINOR = 1

# Stripe: "The amount value supports up to eight digits", for every currency.
MAXIMUM_MINOR = 99_999_999

# A request amount is at most 12 ASCII digits: enough for any in-range value with room to
# report "too large" rather than "invalid", and a bound on what we convert with int().
_AMOUNT_DIGITS_MAX = 12
_AMOUNT_PATTERN = re.compile(rf"0|[1-9][0-9]{{0,{_AMOUNT_DIGITS_MAX - 1}}}")

# Error messages echo the caller's value; cap it so a huge input cannot bloat the response.
_ECHO_CHARS_MAX = 40


@dataclass(frozen=True)
class Currency:
    code: str  # lower-case ISO 4217 code, e.g. "usd"
    exponent: int  # minor-unit digits: usd 2, jpy 0, kwd 3
    name: str  # ISO's English name, e.g. "US Dollar"
    minimum_minor: int
    maximum_minor: int


@functools.cache
def active_currencies() -> tuple[Currency, ...]:
    """Every active ISO 4217 currency a payment can be made in, sorted by code."""
    currencies: list[Currency] = []
    for entry in iso4217.Currency:
        exponent = entry.exponent  # None where ISO says "N.A.": not a currency
        if exponent is None or entry.code in _FUND_CODES or entry.code in _UNIT_OF_ACCOUNT_CODES:
            continue
        code = entry.code.lower()
        currencies.append(
            Currency(
                code=code,
                exponent=exponent,
                name=entry.currency_name,
                minimum_minor=STRIPE_MINIMUM_MINOR.get(code, DEFAULT_MINIMUM_MINOR),
                maximum_minor=MAXIMUM_MINOR,
            )
        )
    return tuple(sorted(currencies, key=lambda currency: currency.code))


@functools.cache
def _currencies_by_code() -> dict[str, Currency]:
    return {currency.code: currency for currency in active_currencies()}


def _echo(value: object) -> str:
    try:
        text = str(value)
    except ValueError:  # an int over Python's 4300-digit str() limit
        text = f"<{type(value).__name__}>"
    if len(text) > _ECHO_CHARS_MAX:
        return text[:_ECHO_CHARS_MAX] + "..."
    return text


def get_currency(code: str) -> Currency:
    """The active currency for `code`, in either case; InvalidRequest on param "currency" if none."""
    currency = _currencies_by_code().get(code.lower()) if isinstance(code, str) else None
    if currency is None:
        raise InvalidRequest(
            f"Invalid currency: {_echo(code)}. Stripe-compatible currencies are three-letter ISO codes in lower case.",
            param="currency",
            code="parameter_invalid",
        )
    return currency


def format_minor(amount_minor: int, currency: Currency) -> str:
    """The exact decimal string for an amount: 1050 usd -> "10.50", 5 kwd -> "0.005"."""
    sign = "-" if amount_minor < 0 else ""
    if currency.exponent == 0:
        return f"{sign}{abs(amount_minor)}"
    major, minor = divmod(abs(amount_minor), 10**currency.exponent)
    return f"{sign}{major}.{minor:0{currency.exponent}d}"


def parse_integer(value: object, param: str) -> int:
    # bool is an int subclass, but `true` is never an amount.
    if isinstance(value, int) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and _AMOUNT_PATTERN.fullmatch(value):
        return int(value)
    raise InvalidRequest(f"Invalid integer: {_echo(value)}", param=param, code="parameter_invalid_integer")


def _check_range(amount_minor: int, minimum_minor: int, currency: Currency, param: str) -> int:
    if amount_minor < minimum_minor:
        raise InvalidRequest(
            f"Amount must be at least {format_minor(minimum_minor, currency)} {currency.code}",
            param=param,
            code="amount_too_small",
        )
    if amount_minor > currency.maximum_minor:
        raise InvalidRequest(
            f"Amount must be no more than {format_minor(currency.maximum_minor, currency)} {currency.code}",
            param=param,
            code="amount_too_large",
        )
    return amount_minor


def parse_amount(value: object, currency: Currency, *, param: str = "amount") -> int:
    """A charge amount from a request: an integer of minor units within the currency's limits.

    Accepts an `int` (not `bool`) or a string of ASCII digits without sign, spaces or
    leading zeros; anything else, floats included, is `parameter_invalid_integer`.
    """
    return _check_range(parse_integer(value, param), currency.minimum_minor, currency, param)


def parse_nonnegative_amount(value: object, currency: Currency, *, param: str) -> int:
    """A partial capture or refund amount: at least one minor unit, no currency minimum."""
    return _check_range(parse_integer(value, param), DEFAULT_MINIMUM_MINOR, currency, param)
