"""Currencies from ISO 4217 (via the `iso4217` package) and request amounts in minor units."""

from __future__ import annotations

from decimal import Decimal

import iso4217
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strongroom.errors import InvalidRequest
from strongroom.money import (
    DEFAULT_MINIMUM_MINOR,
    MAXIMUM_MINOR,
    STRIPE_MINIMUM_MINOR,
    Currency,
    active_currencies,
    format_minor,
    get_currency,
    parse_amount,
    parse_nonnegative_amount,
)

_PROPERTY = settings(max_examples=300)

USD = get_currency("usd")
JPY = get_currency("jpy")
KWD = get_currency("kwd")

FUND_CODES = ["bov", "che", "chw", "clf", "cou", "mxv", "usn", "uyi", "uyw"]


# --- the currency list -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exponent"),
    [
        # Two decimals.
        ("usd", 2),
        ("eur", 2),
        ("gbp", 2),
        ("btn", 2),
        ("uyu", 2),
        ("huf", 2),  # Stripe also uses two decimals for HUF charges.
        ("twd", 2),
        ("mga", 2),  # ISO says 2; Stripe treats MGA as zero-decimal. We follow ISO.
        # Zero decimals.
        ("jpy", 0),
        ("krw", 0),
        ("clp", 0),
        ("isk", 0),
        ("ugx", 0),
        ("vnd", 0),
        ("pyg", 0),
        ("xof", 0),
        ("xaf", 0),
        ("xpf", 0),
        # Three decimals. ISO includes IQD and LYD, which Stripe does not list as three-decimal.
        ("kwd", 3),
        ("bhd", 3),
        ("jod", 3),
        ("omr", 3),
        ("tnd", 3),
        ("iqd", 3),
        ("lyd", 3),
    ],
)
def test_exponent_is_isos_minor_unit(code: str, exponent: int) -> None:
    assert get_currency(code).exponent == exponent


def test_usd_carries_iso_name_and_stripe_limits() -> None:
    assert get_currency("usd") == Currency(
        code="usd", exponent=2, name="US Dollar", minimum_minor=50, maximum_minor=99_999_999
    )


def test_currency_is_immutable() -> None:
    with pytest.raises(AttributeError):
        USD.exponent = 3  # type: ignore[misc]


def test_every_code_is_three_lower_case_ascii_letters() -> None:
    for currency in active_currencies():
        assert len(currency.code) == 3
        assert currency.code.isascii()
        assert currency.code.isalpha()
        assert currency.code.islower()


def test_codes_are_unique_and_sorted() -> None:
    codes = [currency.code for currency in active_currencies()]
    assert len(codes) == len(set(codes))
    assert codes == sorted(codes)


def test_currency_count_is_plausible() -> None:
    # ISO List One of 2026-01-01 gives 155 after the exclusions.
    assert 150 < len(active_currencies()) < 200


def test_every_exponent_is_one_iso_uses() -> None:
    assert {currency.exponent for currency in active_currencies()} <= {0, 2, 3, 4}


def test_list_is_built_once() -> None:
    assert active_currencies() is active_currencies()


@pytest.mark.parametrize("code", ["USD", "usd", "Usd", "uSD"])
def test_lookup_ignores_case(code: str) -> None:
    assert get_currency(code) is USD


@pytest.mark.parametrize(
    "code",
    [
        "xyz",
        "XAU",  # gold
        "xag",
        "xdr",  # SDR
        "xba",  # bond-market unit
        "xts",  # reserved for testing
        "xxx",  # "no currency"
        "xad",  # Arab Accounting Dinar: unit of account although ISO gives it a minor unit
        "bgn",  # withdrawn: Bulgaria adopted the euro on 2026-01-01
        "hrk",  # withdrawn: Croatia adopted the euro in 2023
        "ang",  # withdrawn: replaced by XCG
        "",
        "us",
        "usdd",
        " usd",
        "usd\n",
    ],
)
def test_unknown_or_non_currency_code_is_rejected_with_param_currency(code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        get_currency(code)
    assert caught.value.param == "currency"
    assert caught.value.code == "parameter_invalid"
    assert caught.value.message.startswith(f"Invalid currency: {code}. ")


@pytest.mark.parametrize("code", [123, None, b"usd", ["usd"]])
def test_non_string_currency_is_rejected_with_param_currency(code: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        get_currency(code)  # type: ignore[arg-type]
    assert caught.value.param == "currency"
    assert caught.value.code == "parameter_invalid"


@pytest.mark.parametrize("code", FUND_CODES)
def test_fund_code_is_rejected(code: str) -> None:
    with pytest.raises(InvalidRequest):
        get_currency(code)


def test_every_code_iso_flags_as_fund_is_excluded() -> None:
    # Guards a future data release: a newly flagged fund must not become payable.
    flagged: set[str] = set()
    for entry in iso4217.raw_xml.iter("CcyNtry"):
        name = entry.find("CcyNm")
        if name is not None and name.get("IsFund") == "true":
            flagged.add(entry.findtext("Ccy", "").lower())
    assert flagged  # the XML still carries the flag
    assert flagged <= set(FUND_CODES)
    assert not flagged & {currency.code for currency in active_currencies()}


def test_only_real_x_currencies_are_payable() -> None:
    # A new ISO "X" unit (like XAD in 2025) must be a conscious decision, not an accident.
    x_codes = {currency.code for currency in active_currencies() if currency.code.startswith("x")}
    assert x_codes == {"xaf", "xcd", "xcg", "xof", "xpf"}


def test_long_invalid_currency_is_truncated_in_message() -> None:
    with pytest.raises(InvalidRequest) as caught:
        get_currency("q" * 10_000)
    assert len(caught.value.message) < 200


def test_huge_int_currency_is_rejected_without_crashing() -> None:
    with pytest.raises(InvalidRequest) as caught:
        get_currency(10**5000)  # type: ignore[arg-type]
    assert caught.value.message.startswith("Invalid currency: <int>. ")


# --- limits ----------------------------------------------------------------------------------


def test_stripe_minimums_apply_to_listed_currencies() -> None:
    assert USD.minimum_minor == 50
    assert JPY.minimum_minor == 50
    assert get_currency("gbp").minimum_minor == 30
    assert get_currency("huf").minimum_minor == 17500


def test_currency_without_stripe_minimum_has_one_minor_unit_minimum() -> None:
    assert KWD.minimum_minor == DEFAULT_MINIMUM_MINOR == 1
    assert get_currency("btn").minimum_minor == 1


def test_every_stripe_minimum_key_but_withdrawn_bgn_is_active() -> None:
    # Catches a typo in the table, which would silently fall back to a minimum of 1.
    active = {currency.code for currency in active_currencies()}
    assert set(STRIPE_MINIMUM_MINOR) - active == {"bgn"}
    for code, minimum_minor in STRIPE_MINIMUM_MINOR.items():
        if code in active:
            assert get_currency(code).minimum_minor == minimum_minor


def test_every_currency_allows_eight_digits() -> None:
    assert MAXIMUM_MINOR == 99_999_999
    for currency in active_currencies():
        assert currency.maximum_minor == MAXIMUM_MINOR
        assert 1 <= currency.minimum_minor <= currency.maximum_minor


# --- parse_amount ----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(50, 50), ("50", 50), (1050, 1050), ("99999999", 99_999_999)])
def test_int_or_digit_string_amount_is_accepted(value: object, expected: int) -> None:
    amount_minor = parse_amount(value, USD)
    assert amount_minor == expected
    assert type(amount_minor) is int


@pytest.mark.parametrize(
    "value",
    [
        12.0,
        12.5,
        float("nan"),
        float("inf"),
        "12.5",
        "12.0",
        "1e3",
        " 5",
        "5 ",
        "5\n",
        "+5",
        "-5",
        "",
        "007",
        "1_000",
        "1,000",
        "0x10",
        "\u0665",  # ARABIC-INDIC DIGIT FIVE: str.isdigit() says yes
        "\uff15\uff10",  # FULLWIDTH "50"
        "\u00b2",  # SUPERSCRIPT TWO
        "1234567890123",  # 13 digits
        True,
        False,
        None,
        [1],
        {"value": 1},
        b"50",
        Decimal("50"),
    ],
)
def test_non_integer_amount_is_rejected_with_param_amount(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(value, USD)
    assert caught.value.param == "amount"
    assert caught.value.code == "parameter_invalid_integer"
    assert caught.value.message.startswith("Invalid integer: ")


def test_float_amount_is_rejected_with_param_amount() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(12.5, USD)
    assert caught.value.as_dict() == {
        "type": "invalid_request_error",
        "message": "Invalid integer: 12.5",
        "code": "parameter_invalid_integer",
        "param": "amount",
    }


def test_custom_param_name_is_reported() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount("1.5", USD, param="application_fee_amount")
    assert caught.value.param == "application_fee_amount"
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(1, USD, param="application_fee_amount")
    assert caught.value.param == "application_fee_amount"
    assert caught.value.code == "amount_too_small"


def test_usd_below_fifty_cents_is_too_small() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(49, USD)
    assert caught.value.code == "amount_too_small"
    assert caught.value.param == "amount"
    assert caught.value.message == "Amount must be at least 0.50 usd"
    assert parse_amount(50, USD) == 50


def test_jpy_below_fifty_yen_is_too_small() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount("49", JPY)
    assert caught.value.code == "amount_too_small"
    assert caught.value.message == "Amount must be at least 50 jpy"
    assert parse_amount("50", JPY) == 50


def test_kwd_accepts_one_fils_and_rejects_zero() -> None:
    assert parse_amount(1, KWD) == 1
    with pytest.raises(InvalidRequest) as caught:
        parse_amount("0", KWD)
    assert caught.value.code == "amount_too_small"
    assert caught.value.message == "Amount must be at least 0.001 kwd"


def test_negative_int_amount_is_too_small() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(-5, KWD)
    assert caught.value.code == "amount_too_small"


@pytest.mark.parametrize("value", [100_000_000, "100000000", "999999999999", 10**30])
def test_amount_over_eight_digits_is_too_large(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(value, USD)
    assert caught.value.code == "amount_too_large"
    assert caught.value.param == "amount"
    assert caught.value.message == "Amount must be no more than 999999.99 usd"


def test_long_invalid_amount_is_truncated_in_message() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount("9" * 10_000 + "x", USD)
    assert caught.value.code == "parameter_invalid_integer"
    assert len(caught.value.message) < 100


# --- parse_nonnegative_amount ----------------------------------------------------------------


def test_partial_amount_may_be_below_currency_minimum() -> None:
    assert parse_nonnegative_amount(1, USD, param="amount_to_capture") == 1
    assert parse_nonnegative_amount("1", JPY, param="amount_to_capture") == 1


def test_zero_partial_amount_is_too_small() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nonnegative_amount(0, USD, param="amount_to_capture")
    assert caught.value.code == "amount_too_small"
    assert caught.value.param == "amount_to_capture"
    assert caught.value.message == "Amount must be at least 0.01 usd"


def test_partial_amount_over_eight_digits_is_too_large() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nonnegative_amount(100_000_000, USD, param="amount")
    assert caught.value.code == "amount_too_large"


@pytest.mark.parametrize("value", [1.0, "1.0", "-1", True, None])
def test_non_integer_partial_amount_is_rejected_with_its_param(value: object) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_nonnegative_amount(value, USD, param="amount_to_capture")
    assert caught.value.code == "parameter_invalid_integer"
    assert caught.value.param == "amount_to_capture"


# --- format_minor ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount_minor", "code", "expected"),
    [
        (1050, "usd", "10.50"),
        (5, "usd", "0.05"),
        (0, "usd", "0.00"),
        (-5, "usd", "-0.05"),
        (-1050, "usd", "-10.50"),
        (5, "kwd", "0.005"),
        (12345, "kwd", "12.345"),
        (500, "jpy", "500"),
        (-500, "jpy", "-500"),
        (17500, "huf", "175.00"),
        (99_999_999, "usd", "999999.99"),
    ],
)
def test_format_minor_is_exact(amount_minor: int, code: str, expected: str) -> None:
    assert format_minor(amount_minor, get_currency(code)) == expected


# --- properties ------------------------------------------------------------------------------

currencies = st.sampled_from(active_currencies())


@_PROPERTY
@given(currency=currencies, data=st.data())
def test_any_in_range_digit_string_parses_back_to_its_int(currency: Currency, data: st.DataObject) -> None:
    amount_minor = data.draw(st.integers(currency.minimum_minor, currency.maximum_minor))
    assert parse_amount(str(amount_minor), currency) == amount_minor
    assert parse_amount(amount_minor, currency) == amount_minor


@_PROPERTY
@given(value=st.floats(allow_nan=True, allow_infinity=True), currency=currencies)
def test_any_float_is_rejected(value: float, currency: Currency) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_amount(value, currency)
    assert caught.value.code == "parameter_invalid_integer"
    with pytest.raises(InvalidRequest):
        parse_nonnegative_amount(value, currency, param="amount")


@_PROPERTY
@given(text=st.text(max_size=16))
def test_any_accepted_string_is_the_canonical_decimal_of_the_result(text: str) -> None:
    try:
        amount_minor = parse_nonnegative_amount(text, USD, param="amount")
    except InvalidRequest as error:
        assert error.code in {"parameter_invalid_integer", "amount_too_small", "amount_too_large"}
    else:
        assert str(amount_minor) == text


@_PROPERTY
@given(currency=currencies, amount_minor=st.integers(-(10**15), 10**15))
def test_format_minor_round_trips_for_every_currency(currency: Currency, amount_minor: int) -> None:
    text = format_minor(amount_minor, currency)
    assert int(text.replace(".", "")) == amount_minor
    assert Decimal(text) == Decimal(amount_minor).scaleb(-currency.exponent)
    if currency.exponent == 0:
        assert "." not in text
    else:
        assert len(text.partition(".")[2]) == currency.exponent
