"""The sandbox processor: a simulated remote card processor, deterministic by test card.

It plays a remote system, so it keeps its own tables and commits in its own transactions: what
it recorded survives when the caller's transaction rolls back or the caller crashes, exactly
as a real processor's ledger would. That is what lets crash-recovery code be tested against it.

Every call carries a processor-side idempotency key. The key is claimed with
INSERT … ON CONFLICT DO NOTHING on its primary key, so of any number of concurrent calls with
one key exactly one moves money and the others read its answer back. The same key with other
parameters is refused. Calls refused as malformed, and simulated timeouts and processor
errors, record nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.connectors.base import (
    Authentication,
    CardRef,
    Declined,
    InvalidProcessorRequest,
    ProcessorTimeout,
    ProcessorUnavailable,
)
from strongroom.connectors.sandbox import cards
from strongroom.connectors.sandbox.tables import sandbox_charges, sandbox_operations
from strongroom.ids import ordered_part
from strongroom.store.db import Database, as_utc, insert_ignore, utcnow
from strongroom.store.group import GroupCommit, Write

IDEMPOTENCY_KEY_MAX_CHARS = 255  # Stripe's limit for Idempotency-Key
AMOUNT_MAX_MINOR = 2**63 - 1  # the BIGINT column's range
LIST_LIMIT_MAX = 1000
_INSERT_CHARGE = sandbox_charges.insert()  # built once: it is on every payment's path
_INSERT_OPERATION = sandbox_operations.insert()


class OperationKind(StrEnum):
    AUTHORIZE = "authorize"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"


class Outcome(StrEnum):
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    REQUIRES_ACTION = "requires_action"
    DECLINED = "declined"
    SUCCEEDED = "succeeded"  # capture, void and refund


class ChargeStatus(StrEnum):
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    VOIDED = "voided"


@dataclass(frozen=True)
class SandboxOperation:
    """One answered processor call, as the processor recorded it."""

    idempotency_key: str
    kind: OperationKind
    merchant_id: str
    outcome: Outcome
    processor_ref: str
    charge_ref: str
    amount_minor: int
    currency: str
    decline_code: str | None
    error_code: str | None
    message: str | None
    created_at: dt.datetime


@dataclass(frozen=True)
class SandboxCharge:
    """A successful authorization ("a charge at the processor") and its money state."""

    processor_ref: str
    merchant_id: str
    status: ChargeStatus
    amount_minor: int
    captured_minor: int
    refunded_minor: int
    currency: str
    card_brand: str
    card_last4: str
    created_at: dt.datetime


class SandboxProcessor:
    def __init__(self, db: Database, *, group_commit_max: int = 64, group_commit_turns: int = 0) -> None:
        self._db = db
        self._commits = GroupCommit(db, max_batch=group_commit_max, max_writers=1, gather_turns=group_commit_turns)

    async def authorize(
        self,
        *,
        idempotency_key: str,
        merchant_id: str,
        amount_minor: int,
        currency: str,
        capture: bool,
        card: CardRef,
        authentication: Authentication | None = None,
        livemode: bool = False,
    ) -> SandboxOperation:
        """Authorize (and with `capture`, capture) a payment; raises `Declined` on a decline."""
        currency = _validate(idempotency_key, amount_minor, currency)
        if livemode:
            # A live payment answered by a simulator would look paid and move no money.
            raise InvalidProcessorRequest("The sandbox processor accepts test-mode payments only.")
        test_card = cards.card_for(card.bin, card.last4)
        _simulate_transport_failure(test_card)
        outcome, decline = _decide(test_card, capture, authentication)
        # `authentication` is left out: a requires_action key is completed by a retry with it.
        request = {
            "merchant_id": merchant_id,
            "amount_minor": amount_minor,
            "currency": currency,
            "capture": capture,
            "card": [card.token, card.bin, card.last4, card.exp_month, card.exp_year],
        }
        ref = _new_ref("ch")
        row = _operation_row(idempotency_key, OperationKind.AUTHORIZE, merchant_id, request, ref=ref, charge_ref=ref)
        row |= _outcome_fields(outcome, decline, amount_minor, currency)
        if authentication is None:
            # A new key (nearly every call) is recorded with other calls' in one commit; a key
            # used before fails that insert alone and takes the full path below.
            operation = _operation_from(row)
            writes = [Write(_INSERT_OPERATION, row)]
            if operation.outcome in (Outcome.AUTHORIZED, Outcome.CAPTURED):
                writes.append(Write(_INSERT_CHARGE, _charge_row(operation, card)))
            with contextlib.suppress(sa_exc.IntegrityError):
                await self._commits.commit(writes)
                return _raise_if_declined(operation)
        async with self._db.tx() as conn:
            operation = await self._record_authorization(conn, row, card, authentication)
        return _raise_if_declined(operation)

    async def _record_authorization(
        self,
        conn: AsyncConnection,
        row: dict[str, Any],
        card: CardRef,
        authentication: Authentication | None,
    ) -> SandboxOperation:
        earlier = await _claim_key(conn, row)
        if earlier is None:
            operation = _operation_from(row)
        elif earlier.outcome is Outcome.REQUIRES_ACTION and authentication is not None:
            completed = await _complete_authentication(conn, earlier, row)
            if completed is None:  # a concurrent call completed it first: answer with its outcome
                return await _load_operation(conn, earlier.idempotency_key) or earlier
            operation = completed
        else:
            return earlier
        if operation.outcome in (Outcome.AUTHORIZED, Outcome.CAPTURED):
            await _insert_charge(conn, operation, card)
        return operation

    async def capture(
        self, *, idempotency_key: str, charge_ref: str, amount_minor: int, currency: str
    ) -> SandboxOperation:
        """Capture up to the authorized amount, once; the rest of the hold is released."""
        currency = _validate(idempotency_key, amount_minor, currency)

        def change(charge: SandboxCharge) -> dict[str, Any]:
            _check_currency(charge, currency)
            _check_status(charge, ChargeStatus.AUTHORIZED, "captured")
            if amount_minor > charge.amount_minor:
                raise InvalidProcessorRequest("The capture amount is greater than the authorized amount.")
            return {"status": ChargeStatus.CAPTURED.value, "captured_minor": amount_minor}

        request = {"charge_ref": charge_ref, "amount_minor": amount_minor, "currency": currency}
        return await self._follow_up(
            key=idempotency_key,
            kind=OperationKind.CAPTURE,
            charge_ref=charge_ref,
            request=request,
            amount_minor=amount_minor,
            change=change,
        )

    async def void(self, *, idempotency_key: str, charge_ref: str) -> SandboxOperation:
        """Release an uncaptured authorization."""
        _validate_key(idempotency_key)

        def change(charge: SandboxCharge) -> dict[str, Any]:
            _check_status(charge, ChargeStatus.AUTHORIZED, "voided")
            return {"status": ChargeStatus.VOIDED.value}

        return await self._follow_up(
            key=idempotency_key,
            kind=OperationKind.VOID,
            charge_ref=charge_ref,
            request={"charge_ref": charge_ref},
            amount_minor=None,
            change=change,
        )

    async def refund(
        self, *, idempotency_key: str, charge_ref: str, amount_minor: int, currency: str
    ) -> SandboxOperation:
        """Refund part or all of the captured amount; all refunds together never exceed it."""
        currency = _validate(idempotency_key, amount_minor, currency)

        def change(charge: SandboxCharge) -> dict[str, Any]:
            _check_currency(charge, currency)
            _check_status(charge, ChargeStatus.CAPTURED, "refunded")
            refunded_minor = charge.refunded_minor + amount_minor
            if refunded_minor > charge.captured_minor:
                raise InvalidProcessorRequest("The refunds would exceed the captured amount.")
            return {"refunded_minor": refunded_minor}

        request = {"charge_ref": charge_ref, "amount_minor": amount_minor, "currency": currency}
        return await self._follow_up(
            key=idempotency_key,
            kind=OperationKind.REFUND,
            charge_ref=charge_ref,
            request=request,
            amount_minor=amount_minor,
            change=change,
        )

    async def _follow_up(
        self,
        *,
        key: str,
        kind: OperationKind,
        charge_ref: str,
        request: dict[str, Any],
        amount_minor: int | None,
        change: Callable[[SandboxCharge], dict[str, Any]],
    ) -> SandboxOperation:
        """A capture, void or refund: claim the key under the charge's lock, check, apply.

        `change` checks the locked charge and returns its new values, or raises; raising rolls
        the key's claim back too, so a refused call leaves nothing behind.
        """
        async with self._db.tx() as conn:
            charge = await _lock_charge(conn, charge_ref)
            ref = _new_ref(_REF_KINDS[kind])
            row = _operation_row(key, kind, charge.merchant_id, request, ref=ref, charge_ref=charge_ref)
            amount = charge.amount_minor if amount_minor is None else amount_minor
            row |= _outcome_fields(Outcome.SUCCEEDED, None, amount, charge.currency)
            earlier = await _claim_key(conn, row)
            if earlier is not None:
                return earlier
            await _update_charge(conn, charge_ref, change(charge))
        return _operation_from(row)

    async def fetch_status(self, idempotency_key: str) -> SandboxOperation | None:
        """The recorded answer to the call with this key (declines included); None if never seen."""
        async with self._db.read() as conn:
            return await _load_operation(conn, idempotency_key)

    async def get_charge(self, processor_ref: str) -> SandboxCharge | None:
        async with self._db.read() as conn:
            query = sa.select(sandbox_charges).where(sandbox_charges.c.processor_ref == processor_ref)
            found = (await conn.execute(query)).mappings().first()
        return None if found is None else _charge_from(found)

    async def list_charges(self, merchant_id: str, *, limit: int = 100) -> list[SandboxCharge]:
        """A merchant's charges, newest first."""
        return [_charge_from(row) for row in await self._list(sandbox_charges, merchant_id, limit)]

    async def list_operations(self, merchant_id: str, *, limit: int = 100) -> list[SandboxOperation]:
        """A merchant's answered calls, newest first."""
        return [_operation_from(row) for row in await self._list(sandbox_operations, merchant_id, limit)]

    async def _list(self, table: sa.Table, merchant_id: str, limit: int) -> list[sa.RowMapping]:
        query = (
            sa.select(table)
            .where(table.c.merchant_id == merchant_id)
            .order_by(table.c.created_at.desc())
            .limit(max(1, min(limit, LIST_LIMIT_MAX)))
        )
        async with self._db.read() as conn:
            return list((await conn.execute(query)).mappings())

    async def count_authorizations(self, merchant_id: str) -> int:
        """Successful authorizations ("charges at the processor"), captured or not."""
        return await self._count(sandbox_charges.c.merchant_id == merchant_id)

    async def count_captured_authorizations(self, merchant_id: str) -> int:
        return await self._count(
            sandbox_charges.c.merchant_id == merchant_id,
            sandbox_charges.c.status == ChargeStatus.CAPTURED.value,
        )

    async def captured_minor_by_currency(self, merchant_id: str) -> dict[str, int]:
        """Captured amount per currency (currencies are never summed together)."""
        query = (
            sa.select(sandbox_charges.c.currency, sa.func.sum(sandbox_charges.c.captured_minor))
            .where(sandbox_charges.c.merchant_id == merchant_id)
            .group_by(sandbox_charges.c.currency)
        )
        async with self._db.read() as conn:
            return {currency: int(total) for currency, total in (await conn.execute(query)).all()}

    async def _count(self, *conditions: sa.ColumnElement[bool]) -> int:
        query = sa.select(sa.func.count()).select_from(sandbox_charges).where(*conditions)
        async with self._db.read() as conn:
            return int((await conn.execute(query)).scalar_one())


def _validate_key(idempotency_key: str) -> None:
    if not 0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX_CHARS:
        raise InvalidProcessorRequest("The idempotency key must be 1 to 255 characters.")


def _validate(idempotency_key: str, amount_minor: int, currency: str) -> str:
    """Checks a money-moving call's common parameters; returns the normalised currency."""
    _validate_key(idempotency_key)
    if not 0 < amount_minor <= AMOUNT_MAX_MINOR:
        raise InvalidProcessorRequest("The amount must be a positive integer in minor units.")
    if len(currency) != 3 or not currency.isascii() or not currency.isalpha():
        raise InvalidProcessorRequest(f"Invalid currency: {currency!r}.")
    return currency.lower()


def _simulate_transport_failure(card: cards.SandboxCard) -> None:
    # Raised before anything is recorded: the simulated processor never handled the call.
    if card.behaviour is cards.Behaviour.TIME_OUT:
        raise ProcessorTimeout("The sandbox processor did not answer in time.", raw_code="timeout")
    if card.behaviour is cards.Behaviour.FAIL:
        raise ProcessorUnavailable("The sandbox processor returned an error.", raw_code="api_error")


def _decide(
    card: cards.SandboxCard, capture: bool, authentication: Authentication | None
) -> tuple[Outcome, cards.Decline | None]:
    if card.decline is not None:
        return Outcome.DECLINED, card.decline
    if card.behaviour is cards.Behaviour.REQUIRE_3DS:
        if authentication is None:
            return Outcome.REQUIRES_ACTION, None
        if authentication is Authentication.FAILED:
            return Outcome.DECLINED, cards.AUTHENTICATION_FAILURE
    return (Outcome.CAPTURED if capture else Outcome.AUTHORIZED), None


def _raise_if_declined(operation: SandboxOperation) -> SandboxOperation:
    if operation.outcome is Outcome.DECLINED:
        raise declined_error(operation)
    return operation


def declined_error(operation: SandboxOperation) -> Declined:
    """The `Declined` a declined authorization raised, rebuilt from its record for replays."""
    return Declined(
        operation.decline_code or "generic_decline",
        operation.message or cards.DECLINED_MESSAGE,
        raw_code=operation.error_code,
    )


_REF_KINDS = {
    OperationKind.AUTHORIZE: "ch",
    OperationKind.CAPTURE: "cap",
    OperationKind.VOID: "void",
    OperationKind.REFUND: "re",
}


def _new_ref(kind: str) -> str:
    return f"sbx_{kind}_{ordered_part()}"


def _request_hash(request: Mapping[str, Any]) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _operation_row(
    key: str, kind: OperationKind, merchant_id: str, request: dict[str, Any], *, ref: str, charge_ref: str
) -> dict[str, Any]:
    now = utcnow()
    return {
        "idempotency_key": key,
        "kind": kind.value,
        "merchant_id": merchant_id,
        "request_hash": _request_hash({"kind": kind.value, **request}),
        "request": request,
        "processor_ref": ref,
        "charge_ref": charge_ref,
        "created_at": now,
        "updated_at": now,
    }


def _outcome_fields(
    outcome: Outcome, decline: cards.Decline | None, amount_minor: int, currency: str
) -> dict[str, Any]:
    return {
        "outcome": outcome.value,
        "amount_minor": amount_minor,
        "currency": currency,
        "decline_code": decline.decline_code if decline else None,
        "error_code": decline.error_code if decline else None,
        "message": decline.message if decline else None,
    }


async def _claim_key(conn: AsyncConnection, row: dict[str, Any]) -> SandboxOperation | None:
    """Records `row` under its key and returns None; or returns the earlier call under that key.

    On PostgreSQL a concurrent claim of the same key waits here until the first commits, and
    then reads its row (READ COMMITTED: each statement sees what committed before it began).
    """
    inserted = await conn.execute(insert_ignore(conn.dialect.name, sandbox_operations), row)
    if inserted.rowcount == 1:
        return None
    earlier = await _load_row(conn, row["idempotency_key"])
    if earlier is None:  # the conflicting row vanished: only possible if someone deleted it
        raise InvalidProcessorRequest("The idempotency key is in an inconsistent state; retry.")
    if earlier["request_hash"] != row["request_hash"]:
        raise InvalidProcessorRequest(
            "This idempotency key was already used with other parameters.",
            raw_code="idempotency_error",
        )
    return _operation_from(earlier)


async def _complete_authentication(
    conn: AsyncConnection, earlier: SandboxOperation, row: dict[str, Any]
) -> SandboxOperation | None:
    """Records the outcome of the cardholder's authentication on a requires_action authorization.

    None if a concurrent call completed it first (the row is no longer requires_action).
    """
    outcome = {k: row[k] for k in ("outcome", "decline_code", "error_code", "message")}
    completed = await conn.execute(
        sa.update(sandbox_operations)
        .where(
            sandbox_operations.c.idempotency_key == earlier.idempotency_key,
            sandbox_operations.c.outcome == Outcome.REQUIRES_ACTION.value,
        )
        .values(**outcome, updated_at=utcnow())
    )
    if completed.rowcount != 1:
        return None
    return dataclasses.replace(earlier, **outcome | {"outcome": Outcome(row["outcome"])})


async def _load_row(conn: AsyncConnection, key: str) -> sa.RowMapping | None:
    query = sa.select(sandbox_operations).where(sandbox_operations.c.idempotency_key == key)
    return (await conn.execute(query)).mappings().first()


async def _load_operation(conn: AsyncConnection, key: str) -> SandboxOperation | None:
    found = await _load_row(conn, key)
    return None if found is None else _operation_from(found)


async def _insert_charge(conn: AsyncConnection, operation: SandboxOperation, card: CardRef) -> None:
    await conn.execute(_INSERT_CHARGE, _charge_row(operation, card))


def _charge_row(operation: SandboxOperation, card: CardRef) -> dict[str, Any]:
    captured = operation.outcome is Outcome.CAPTURED
    return {
        "processor_ref": operation.charge_ref,
        "merchant_id": operation.merchant_id,
        "idempotency_key": operation.idempotency_key,
        "status": (ChargeStatus.CAPTURED if captured else ChargeStatus.AUTHORIZED).value,
        "amount_minor": operation.amount_minor,
        "captured_minor": operation.amount_minor if captured else 0,
        "refunded_minor": 0,
        "currency": operation.currency,
        "card_brand": card.brand,
        "card_last4": card.last4,
        "created_at": operation.created_at,
        "updated_at": operation.created_at,
    }


async def _lock_charge(conn: AsyncConnection, charge_ref: str) -> SandboxCharge:
    # FOR UPDATE serialises calls on one charge on PostgreSQL; SQLite's BEGIN IMMEDIATE
    # (see store.db) already serialises every writing transaction, and SQLAlchemy omits the clause.
    query = sa.select(sandbox_charges).where(sandbox_charges.c.processor_ref == charge_ref).with_for_update()
    found = (await conn.execute(query)).mappings().first()
    if found is None:
        raise InvalidProcessorRequest(f"No such charge: '{charge_ref}'")
    return _charge_from(found)


async def _update_charge(conn: AsyncConnection, charge_ref: str, values: dict[str, Any]) -> None:
    await conn.execute(
        sa.update(sandbox_charges)
        .where(sandbox_charges.c.processor_ref == charge_ref)
        .values(**values, updated_at=utcnow())
    )


def _check_currency(charge: SandboxCharge, currency: str) -> None:
    if currency != charge.currency:
        raise InvalidProcessorRequest(f"Charge {charge.processor_ref} is in {charge.currency}, not {currency}")


def _check_status(charge: SandboxCharge, required: ChargeStatus, verb: str) -> None:
    if charge.status is not required:
        raise InvalidProcessorRequest(f"Charge {charge.processor_ref} is {charge.status}; it cannot be {verb}.")


def _operation_from(row: Mapping[Any, Any]) -> SandboxOperation:
    return SandboxOperation(
        idempotency_key=row["idempotency_key"],
        kind=OperationKind(row["kind"]),
        merchant_id=row["merchant_id"],
        outcome=Outcome(row["outcome"]),
        processor_ref=row["processor_ref"],
        charge_ref=row["charge_ref"],
        amount_minor=int(row["amount_minor"]),
        currency=row["currency"],
        decline_code=row["decline_code"],
        error_code=row["error_code"],
        message=row["message"],
        created_at=as_utc(row["created_at"]),
    )


def _charge_from(row: Mapping[Any, Any]) -> SandboxCharge:
    return SandboxCharge(
        processor_ref=row["processor_ref"],
        merchant_id=row["merchant_id"],
        status=ChargeStatus(row["status"]),
        amount_minor=int(row["amount_minor"]),
        captured_minor=int(row["captured_minor"]),
        refunded_minor=int(row["refunded_minor"]),
        currency=row["currency"],
        card_brand=row["card_brand"],
        card_last4=row["card_last4"],
        created_at=as_utc(row["created_at"]),
    )
