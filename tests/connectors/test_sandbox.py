"""The sandbox processor and its connector, on SQLite and (with STRONGROOM_TEST_DATABASE_URL) PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from strongroom.connectors.base import (
    Authentication,
    AuthorizationStatus,
    AuthorizeRequest,
    CaptureRequest,
    CardRef,
    Connector,
    Declined,
    InvalidProcessorRequest,
    ProcessorTimeout,
    ProcessorUnavailable,
    RefundRequest,
    VoidRequest,
)
from strongroom.connectors.sandbox import SandboxConnector, SandboxProcessor, cards
from strongroom.connectors.sandbox.processor import ChargeStatus, OperationKind, Outcome
from strongroom.ids import random_part
from strongroom.store import Database, metadata

PG_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
BACKENDS = ["sqlite", *(["postgresql"] if PG_URL else [])]

SUCCESS_CARDS = {
    "4242424242424242": ("visa", "credit"),
    "4000056655665556": ("visa", "debit"),
    "5555555555554444": ("mastercard", "credit"),
    "2223003122003222": ("mastercard", "credit"),
    "5200828282828210": ("mastercard", "debit"),
    "378282246310005": ("amex", "credit"),
    "371449635398431": ("amex", "credit"),
    "6011111111111117": ("discover", "credit"),
    "3056930009020004": ("diners", "credit"),
    "36227206271667": ("diners", "credit"),
    "3566002020360505": ("jcb", "credit"),
    "6200000000000005": ("unionpay", "credit"),
}
DECLINE_CARDS = {
    "4000000000000002": "generic_decline",
    "4000000000009995": "insufficient_funds",
    "4000000000009987": "lost_card",
    "4000000000009979": "stolen_card",
    "4000000000000069": "expired_card",
    "4000000000000127": "incorrect_cvc",
    "4000000000000119": "processing_error",
}
THREE_DS_CARD = "4000002500003155"
TIMEOUT_CARD = "4000000000000408"
PROCESSOR_ERROR_CARD = "4000000000005035"


# --- fixtures -------------------------------------------------------------------------------


async def _create_pg_database(admin_url: str, name: str) -> str:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        await admin.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def _drop_pg_database(admin_url: str, name: str) -> None:
    admin = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with admin.connect() as conn:
            await conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await admin.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
async def db(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    """One database per backend for the session; tests stay apart by random merchant ids and keys."""
    pg_name = f"sandbox_test_{secrets.token_hex(6)}"
    if request.param == "postgresql":
        assert PG_URL is not None
        url = await _create_pg_database(PG_URL, pg_name)
    else:
        url = "sqlite+aiosqlite:///" + str(tmp_path_factory.mktemp("sandbox") / "t.db")
    # 25 + 25 overflow: room for the 50 concurrent calls of the race tests.
    database = Database(url, pool_size=25)
    async with database.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield database
    finally:
        await database.dispose()
        if request.param == "postgresql":
            assert PG_URL is not None
            await _drop_pg_database(PG_URL, pg_name)


@pytest.fixture
def processor(db: Database) -> SandboxProcessor:
    return SandboxProcessor(db)


@pytest.fixture
def connector(processor: SandboxProcessor) -> SandboxConnector:
    return SandboxConnector(processor)


# --- factories ------------------------------------------------------------------------------


def new_merchant() -> str:
    return "acct_" + random_part()


def new_key() -> str:
    return "key_" + random_part()


def card_ref(number: str, merchant_id: str) -> CardRef:
    return CardRef(
        merchant_id=merchant_id,
        token="card_" + random_part(),
        brand=cards.detect_brand(number),
        bin=number[:6],
        last4=number[-4:],
        exp_month=12,
        exp_year=2034,
    )


def authorize_request(
    number: str,
    *,
    merchant_id: str | None = None,
    key: str | None = None,
    amount_minor: int = 1000,
    capture: bool = True,
    authentication: Authentication | None = None,
    card: CardRef | None = None,
) -> AuthorizeRequest:
    merchant_id = merchant_id or new_merchant()
    return AuthorizeRequest(
        idempotency_key=key or new_key(),
        merchant_id=merchant_id,
        amount_minor=amount_minor,
        currency="usd",
        capture=capture,
        card=card or card_ref(number, merchant_id),
        authentication=authentication,
    )


async def authorized(connector: SandboxConnector, amount_minor: int = 1000, *, capture: bool) -> str:
    authorization = await connector.authorize(
        authorize_request("4242424242424242", amount_minor=amount_minor, capture=capture)
    )
    return authorization.processor_ref


def capture_request(ref: str, amount_minor: int, key: str | None = None) -> CaptureRequest:
    return CaptureRequest(key or new_key(), ref, amount_minor, "usd")


def refund_request(ref: str, amount_minor: int, key: str | None = None) -> RefundRequest:
    return RefundRequest(key or new_key(), ref, amount_minor, "usd")


# --- card outcomes --------------------------------------------------------------------------


def test_connector_implements_the_protocol(connector: SandboxConnector) -> None:
    as_protocol: Connector = connector
    assert as_protocol.name == "sandbox"


@pytest.mark.parametrize("number", SUCCESS_CARDS)
async def test_success_card_is_captured_and_counted_once(
    connector: SandboxConnector, processor: SandboxProcessor, number: str
) -> None:
    request = authorize_request(number)
    authorization = await connector.authorize(request)
    assert authorization.status is AuthorizationStatus.CAPTURED
    assert authorization.processor_ref.startswith("sbx_ch_")
    assert (authorization.amount_minor, authorization.currency) == (1000, "usd")
    assert await processor.count_authorizations(request.merchant_id) == 1
    assert await processor.count_captured_authorizations(request.merchant_id) == 1
    assert await processor.captured_minor_by_currency(request.merchant_id) == {"usd": 1000}


async def test_authorize_without_capture_holds_funds_only(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request("5555555555554444", capture=False)
    authorization = await connector.authorize(request)
    assert authorization.status is AuthorizationStatus.AUTHORIZED
    assert await processor.count_authorizations(request.merchant_id) == 1
    assert await processor.count_captured_authorizations(request.merchant_id) == 0
    assert await processor.captured_minor_by_currency(request.merchant_id) == {"usd": 0}


async def test_card_outside_the_table_succeeds(connector: SandboxConnector) -> None:
    authorization = await connector.authorize(authorize_request("4111111111111111"))
    assert authorization.status is AuthorizationStatus.CAPTURED


@pytest.mark.parametrize(("number", "decline_code"), DECLINE_CARDS.items())
async def test_decline_card_declines_the_same_way_on_replay_and_status(
    connector: SandboxConnector, processor: SandboxProcessor, number: str, decline_code: str
) -> None:
    request = authorize_request(number)
    with pytest.raises(Declined) as first:
        await connector.authorize(request)
    assert first.value.decline_code == decline_code
    with pytest.raises(Declined) as replayed:
        await connector.authorize(request)
    with pytest.raises(Declined) as fetched:
        await connector.fetch_status(request.idempotency_key)
    for error in (replayed.value, fetched.value):
        assert (error.decline_code, error.message, error.raw_code) == (
            first.value.decline_code,
            first.value.message,
            first.value.raw_code,
        )
    assert await processor.count_authorizations(request.merchant_id) == 0


async def test_timeout_card_times_out_every_time_and_records_nothing(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request(TIMEOUT_CARD)
    for _ in range(2):
        with pytest.raises(ProcessorTimeout):
            await connector.authorize(request)
    assert await connector.fetch_status(request.idempotency_key) is None
    assert await processor.list_operations(request.merchant_id) == []


async def test_processor_error_card_raises_unavailable_and_records_nothing(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request(PROCESSOR_ERROR_CARD)
    with pytest.raises(ProcessorUnavailable):
        await connector.authorize(request)
    assert await connector.fetch_status(request.idempotency_key) is None
    assert await processor.count_authorizations(request.merchant_id) == 0


# --- 3-D Secure -----------------------------------------------------------------------------


async def test_3ds_card_requires_action_then_succeeds_after_authentication_with_the_same_key(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request(THREE_DS_CARD)
    pending = await connector.authorize(request)
    assert pending.status is AuthorizationStatus.REQUIRES_ACTION
    assert await processor.count_authorizations(request.merchant_id) == 0
    assert await connector.fetch_status(request.idempotency_key) == pending
    assert await connector.authorize(request) == pending  # still waiting for the cardholder

    done = await connector.authorize(
        authorize_request(
            THREE_DS_CARD,
            merchant_id=request.merchant_id,
            key=request.idempotency_key,
            card=request.card,
            authentication=Authentication.SUCCEEDED,
        )
    )
    assert done.status is AuthorizationStatus.CAPTURED
    assert done.processor_ref == pending.processor_ref
    assert await processor.count_authorizations(request.merchant_id) == 1
    assert await connector.fetch_status(request.idempotency_key) == done
    assert await connector.authorize(request) == done  # a late retry without it answers the outcome


async def test_3ds_card_authorized_with_a_new_key_after_authentication(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request(THREE_DS_CARD, capture=False)
    assert (await connector.authorize(request)).status is AuthorizationStatus.REQUIRES_ACTION
    done = await connector.authorize(
        authorize_request(
            THREE_DS_CARD,
            merchant_id=request.merchant_id,
            capture=False,
            authentication=Authentication.SUCCEEDED,
        )
    )
    assert done.status is AuthorizationStatus.AUTHORIZED
    assert await processor.count_authorizations(request.merchant_id) == 1


async def test_3ds_failed_authentication_declines_for_good(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request(THREE_DS_CARD)
    await connector.authorize(request)
    retry = authorize_request(
        THREE_DS_CARD,
        merchant_id=request.merchant_id,
        key=request.idempotency_key,
        card=request.card,
        authentication=Authentication.FAILED,
    )
    with pytest.raises(Declined) as failed:
        await connector.authorize(retry)
    assert failed.value.decline_code == "authentication_failure"
    assert failed.value.raw_code == "payment_intent_authentication_failure"
    succeeded_later = authorize_request(
        THREE_DS_CARD,
        merchant_id=request.merchant_id,
        key=request.idempotency_key,
        card=request.card,
        authentication=Authentication.SUCCEEDED,
    )
    with pytest.raises(Declined):
        await connector.authorize(succeeded_later)  # the key's outcome is final
    assert await processor.count_authorizations(request.merchant_id) == 0


# --- idempotency ----------------------------------------------------------------------------


async def test_replay_returns_the_same_ref_and_charges_once(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request("4242424242424242")
    first = await connector.authorize(request)
    again = await connector.authorize(request)
    assert again == first
    assert await processor.count_authorizations(request.merchant_id) == 1


async def test_same_key_with_a_different_amount_is_refused_and_changes_nothing(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request("4242424242424242")
    first = await connector.authorize(request)
    other = authorize_request(
        "4242424242424242",
        merchant_id=request.merchant_id,
        key=request.idempotency_key,
        card=request.card,
        amount_minor=2000,
    )
    with pytest.raises(InvalidProcessorRequest):
        await connector.authorize(other)
    assert await connector.fetch_status(request.idempotency_key) == first
    assert await processor.count_authorizations(request.merchant_id) == 1


async def test_same_key_for_a_different_operation_is_refused(connector: SandboxConnector) -> None:
    ref = await authorized(connector, capture=False)
    key = new_key()
    await connector.capture(capture_request(ref, 500, key))
    with pytest.raises(InvalidProcessorRequest):
        await connector.void(VoidRequest(key, ref))
    with pytest.raises(InvalidProcessorRequest):
        await connector.fetch_status(key)  # a capture's key has no authorization status


async def test_fifty_concurrent_authorizations_with_one_key_charge_once(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    request = authorize_request("4242424242424242")
    results = await asyncio.gather(*(connector.authorize(request) for _ in range(50)))
    assert {r.processor_ref for r in results} == {results[0].processor_ref}
    assert await processor.count_authorizations(request.merchant_id) == 1
    assert len(await processor.list_operations(request.merchant_id)) == 1


async def test_fifty_concurrent_refunds_never_exceed_the_captured_amount(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    ref = await authorized(connector, 1000, capture=True)

    async def attempt() -> bool:
        try:
            await connector.refund(refund_request(ref, 100))
        except InvalidProcessorRequest:
            return False
        return True

    outcomes = await asyncio.gather(*(attempt() for _ in range(50)))
    assert sum(outcomes) == 10
    charge = await processor.get_charge(ref)
    assert charge is not None and charge.refunded_minor == 1000


# --- capture, void, refund ------------------------------------------------------------------


async def test_partial_capture_captures_the_amount_asked(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    ref = await authorized(connector, 1000, capture=False)
    result = await connector.capture(capture_request(ref, 600))
    assert result.amount_minor == 600 and result.processor_ref.startswith("sbx_cap_")
    charge = await processor.get_charge(ref)
    assert charge is not None
    assert (charge.status, charge.amount_minor, charge.captured_minor) == (ChargeStatus.CAPTURED, 1000, 600)
    assert await processor.captured_minor_by_currency(charge.merchant_id) == {"usd": 600}


async def test_capture_above_the_authorized_amount_is_refused(connector: SandboxConnector) -> None:
    ref = await authorized(connector, 1000, capture=False)
    with pytest.raises(InvalidProcessorRequest):
        await connector.capture(capture_request(ref, 1001))


async def test_capture_in_another_currency_is_refused(connector: SandboxConnector) -> None:
    ref = await authorized(connector, 1000, capture=False)
    with pytest.raises(InvalidProcessorRequest):
        await connector.capture(CaptureRequest(new_key(), ref, 1000, "eur"))


async def test_capture_twice_is_refused_but_its_replay_answers(connector: SandboxConnector) -> None:
    ref = await authorized(connector, 1000, capture=False)
    key = new_key()
    first = await connector.capture(capture_request(ref, 1000, key))
    with pytest.raises(InvalidProcessorRequest):
        await connector.capture(capture_request(ref, 1000))
    assert await connector.capture(capture_request(ref, 1000, key)) == first


async def test_capture_of_an_unknown_charge_is_refused(connector: SandboxConnector) -> None:
    with pytest.raises(InvalidProcessorRequest):
        await connector.capture(capture_request("sbx_ch_nope", 100))


async def test_refund_total_is_never_above_the_captured_amount(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    ref = await authorized(connector, 1000, capture=False)
    await connector.capture(capture_request(ref, 800))
    assert (await connector.refund(refund_request(ref, 500))).processor_ref.startswith("sbx_re_")
    with pytest.raises(InvalidProcessorRequest):
        await connector.refund(refund_request(ref, 301))
    await connector.refund(refund_request(ref, 300))
    with pytest.raises(InvalidProcessorRequest):
        await connector.refund(refund_request(ref, 1))
    charge = await processor.get_charge(ref)
    assert charge is not None and charge.refunded_minor == 800


async def test_refund_replay_does_not_refund_twice(connector: SandboxConnector, processor: SandboxProcessor) -> None:
    ref = await authorized(connector, 1000, capture=True)
    request = refund_request(ref, 400)
    first = await connector.refund(request)
    assert await connector.refund(request) == first
    charge = await processor.get_charge(ref)
    assert charge is not None and charge.refunded_minor == 400


async def test_refund_of_an_uncaptured_authorization_is_refused(connector: SandboxConnector) -> None:
    ref = await authorized(connector, capture=False)
    with pytest.raises(InvalidProcessorRequest):
        await connector.refund(refund_request(ref, 100))


async def test_void_releases_an_uncaptured_authorization(
    connector: SandboxConnector, processor: SandboxProcessor
) -> None:
    ref = await authorized(connector, 1000, capture=False)
    request = VoidRequest(new_key(), ref)
    result = await connector.void(request)
    assert result.amount_minor == 1000 and result.processor_ref.startswith("sbx_void_")
    assert await connector.void(request) == result
    charge = await processor.get_charge(ref)
    assert charge is not None and charge.status is ChargeStatus.VOIDED
    with pytest.raises(InvalidProcessorRequest):
        await connector.capture(capture_request(ref, 1000))
    with pytest.raises(InvalidProcessorRequest):
        await connector.void(VoidRequest(new_key(), ref))


async def test_void_of_a_captured_charge_is_refused(connector: SandboxConnector) -> None:
    ref = await authorized(connector, capture=True)
    with pytest.raises(InvalidProcessorRequest):
        await connector.void(VoidRequest(new_key(), ref))


# --- status and records ---------------------------------------------------------------------


async def test_fetch_status_of_known_and_unknown_keys(connector: SandboxConnector) -> None:
    request = authorize_request("4242424242424242", capture=False)
    authorization = await connector.authorize(request)
    assert await connector.fetch_status(request.idempotency_key) == authorization
    assert await connector.fetch_status(new_key()) is None


async def test_livemode_requests_are_refused(connector: SandboxConnector) -> None:
    request = authorize_request("4242424242424242")
    live = AuthorizeRequest(**{**request.__dict__, "livemode": True})
    with pytest.raises(InvalidProcessorRequest):
        await connector.authorize(live)
    assert await connector.fetch_status(request.idempotency_key) is None


@pytest.mark.parametrize(
    ("amount_minor", "currency", "key"),
    [(0, "usd", "k"), (-5, "usd", "k"), (100, "us", "k"), (100, "usd", "")],
)
async def test_malformed_requests_are_refused(
    connector: SandboxConnector, amount_minor: int, currency: str, key: str
) -> None:
    request = authorize_request("4242424242424242", amount_minor=1)
    bad = AuthorizeRequest(
        **{**request.__dict__, "amount_minor": amount_minor, "currency": currency, "idempotency_key": key}
    )
    with pytest.raises(InvalidProcessorRequest):
        await connector.authorize(bad)


async def test_operations_are_listed_per_merchant(connector: SandboxConnector, processor: SandboxProcessor) -> None:
    merchant_id = new_merchant()
    request = authorize_request("4242424242424242", merchant_id=merchant_id, capture=False)
    authorization = await connector.authorize(request)
    await connector.capture(capture_request(authorization.processor_ref, 1000))
    with pytest.raises(Declined):
        await connector.authorize(authorize_request("4000000000000002", merchant_id=merchant_id))
    operations = await processor.list_operations(merchant_id)
    assert sorted(op.kind for op in operations) == [
        OperationKind.AUTHORIZE,
        OperationKind.AUTHORIZE,
        OperationKind.CAPTURE,
    ]
    assert sorted(op.outcome for op in operations) == [
        Outcome.AUTHORIZED,
        Outcome.DECLINED,
        Outcome.SUCCEEDED,
    ]
    assert [c.processor_ref for c in await processor.list_charges(merchant_id)] == [authorization.processor_ref]


async def test_processor_state_survives_the_callers_rollback(
    db: Database, connector: SandboxConnector, processor: SandboxProcessor, tmp_path: Path
) -> None:
    # On SQLite a caller holding a write transaction would block the processor's own one, so the
    # caller's work lives in another file there; on PostgreSQL it is the same database.
    caller_db = db if not db.is_sqlite else Database("sqlite+aiosqlite:///" + str(tmp_path / "caller.db"))
    request = authorize_request("4242424242424242")

    class CallerFailed(Exception):
        pass

    with pytest.raises(CallerFailed):
        async with caller_db.tx() as conn:
            await conn.execute(sa.text("SELECT 1"))
            await connector.authorize(request)
            raise CallerFailed
    if caller_db is not db:
        await caller_db.dispose()
    assert await connector.fetch_status(request.idempotency_key) is not None
    assert await processor.count_authorizations(request.merchant_id) == 1


# --- card numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("number", "brand_funding"), SUCCESS_CARDS.items())
def test_brand_and_funding_of_the_stripe_test_cards(number: str, brand_funding: tuple[str, str]) -> None:
    assert cards.luhn_valid(number)
    assert (cards.detect_brand(number), cards.funding_for(number)) == brand_funding


def test_every_table_card_is_luhn_valid_and_the_custom_ones_are_not_stripes() -> None:
    assert all(cards.luhn_valid(card.number) for card in cards.TEST_CARDS)
    published = set(SUCCESS_CARDS) | set(DECLINE_CARDS) | {THREE_DS_CARD}
    assert {TIMEOUT_CARD, PROCESSOR_ERROR_CARD}.isdisjoint(published)
    pairs = [(c.bin, c.last4) for c in cards.TEST_CARDS]
    assert len(pairs) == len(set(pairs))


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4111111111111111", "visa"),
        ("5105105105105100", "mastercard"),
        ("2720990000000007", "mastercard"),
        ("2221000000000009", "mastercard"),
        ("2220990000000000", "unknown"),
        ("340000000000009", "amex"),
        ("6445644564456445", "discover"),
        ("6500000000000002", "discover"),
        ("38520000023237", "diners"),
        ("3528000000000007", "jcb"),
        ("3590000000000000", "unknown"),
        ("9999999999999995", "unknown"),
        ("", "unknown"),
        ("4242 4242", "unknown"),
    ],
)
def test_detect_brand_by_iin_range(number: str, brand: str) -> None:
    assert cards.detect_brand(number) == brand


FULL_WIDTH_4242 = "\uff14\uff12" * 8  # str.isdigit() is True for full-width digits


@pytest.mark.parametrize("number", ["4242424242424241", "", "0", "4242-4242-4242-4242", FULL_WIDTH_4242])
def test_invalid_numbers_fail_luhn(number: str) -> None:
    assert not cards.luhn_valid(number)
    assert cards.funding_for(number) == "unknown"


def _reference_check_digit(payload: str) -> str:
    """Luhn written differently from the module: double from the right, starting next to the check digit."""
    total = 0
    for index, char in enumerate(reversed(payload)):
        value = int(char) * (2 if index % 2 == 0 else 1)
        total += value // 10 + value % 10
    return str(-total % 10)


digit_strings = st.text(alphabet="0123456789", min_size=1, max_size=30)


@given(digit_strings)
def test_a_correct_check_digit_makes_any_digit_string_luhn_valid(payload: str) -> None:
    check = _reference_check_digit(payload)
    assert cards.luhn_valid(payload + check)
    assert cards.luhn_check_digit(payload) == check
    assert [d for d in "0123456789" if cards.luhn_valid(payload + d)] == [check]


@given(digit_strings, st.data())
def test_changing_any_one_digit_breaks_luhn(payload: str, data: st.DataObject) -> None:
    number = payload + _reference_check_digit(payload)
    position = data.draw(st.integers(0, len(number) - 1))
    replacement = data.draw(st.sampled_from([d for d in "0123456789" if d != number[position]]))
    assert not cards.luhn_valid(number[:position] + replacement + number[position + 1 :])
