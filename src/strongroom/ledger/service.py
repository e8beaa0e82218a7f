"""Journal postings and balances.

`post` writes one journal transaction and its entries in the CALLER's transaction, so a money
movement, its posting and its event commit together (ARCHITECTURE: data rules). It raises
`InvariantError` (never caught: a bug) unless the entries balance per currency, and the
database refuses a second posting for the same (source, kind) by a unique constraint.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import InvariantError, ResourceMissing
from strongroom.ids import new_id
from strongroom.ledger.models import (
    LISTED_KINDS,
    MERCHANT_ACCOUNTS,
    MERCHANT_AVAILABLE,
    MERCHANT_PENDING,
    Entry,
    Kind,
    account_type,
    normal_balance,
    receivable,
)
from strongroom.ledger.tables import ledger_entries, ledger_transactions
from strongroom.store.db import epoch_s, utcnow
from strongroom.store.group import Write
from strongroom.store.paging import Page, PageRequest, fetch_page

# Built once: constant statements compile once (the posting is on the payment hot path).
_INSERT_TRANSACTION = ledger_transactions.insert()
_INSERT_ENTRY = ledger_entries.insert()


def unbalanced_currencies(entries: Iterable[tuple[str, int]]) -> dict[str, int]:
    """{currency: non-zero sum} for (currency, signed amount) pairs that do not sum to zero."""
    sums: dict[str, int] = defaultdict(int)
    for currency, amount_minor in entries:
        sums[currency] += amount_minor
    return {currency: total for currency, total in sums.items() if total != 0}


def posting(
    principal: Principal,
    source_type: str,
    source_id: str,
    kind: str,
    currency: str,
    entries: Sequence[Entry],
) -> list[Write]:
    """The writes of one balanced journal transaction (all entries in `currency`): its row first,
    then its entries. Raises `InvariantError` unless it balances. `post` adds the never-negative
    check; a caller writing these itself must need none (a capture credits the merchant)."""
    if len(entries) < 2:
        raise InvariantError(f"a journal transaction needs at least two entries ({kind} {source_id})")
    for entry in entries:
        if account_type(entry.account) is None:
            raise InvariantError(f"account {entry.account!r} is not in the chart of accounts")
    off = unbalanced_currencies((currency, e.amount_minor) for e in entries)
    if off:
        raise InvariantError(f"journal transaction for {kind} {source_id} does not balance: {off}")
    transaction_id = new_id("balance_transaction")
    row = {
        "merchant_id": principal.merchant_id,
        "id": transaction_id,
        "livemode": principal.livemode,
        "created": utcnow(),
        "source_type": source_type,
        "source_id": source_id,
        "kind": kind,
        "currency": currency,
    }
    lines = [
        Write(
            _INSERT_ENTRY,
            {
                "merchant_id": principal.merchant_id,
                "transaction_id": transaction_id,
                "line": line,
                "livemode": principal.livemode,
                "account": e.account,
                "currency": currency,
                "amount_minor": e.amount_minor,
            },
        )
        for line, e in enumerate(entries)
    ]
    return [Write(_INSERT_TRANSACTION, row), *lines]


async def post(
    conn: AsyncConnection,
    principal: Principal,
    source_type: str,
    source_id: str,
    kind: str,
    currency: str,
    entries: Sequence[Entry],
) -> str:
    """One balanced journal transaction (all entries in `currency`); returns its `txn_` id."""
    head, *lines = posting(principal, source_type, source_id, kind, currency, entries)
    await conn.execute(head.statement, head.params)
    await conn.execute(_INSERT_ENTRY, [line.params for line in lines])
    await _check_never_negative(conn, principal, currency, entries)
    transaction_id: str = head.params["id"]
    return transaction_id


async def _check_never_negative(
    conn: AsyncConnection, principal: Principal, currency: str, entries: Sequence[Entry]
) -> None:
    # Only an entry against an account's normal side can take it below zero; captures never do,
    # so the payment hot path pays nothing for this check.
    for entry in entries:
        kind = account_type(entry.account)
        if kind is None or not kind.never_negative or normal_balance(kind, entry.amount_minor) >= 0:
            continue
        balance = normal_balance(kind, await _signed_sum(conn, principal, entry.account, currency))
        if balance < 0:
            raise InvariantError(f"account {entry.account} ({currency}) would go negative: {balance}")


async def _signed_sum(conn: AsyncConnection, principal: Principal, account: str, currency: str) -> int:
    total = await conn.scalar(
        sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount_minor), 0)).where(
            ledger_entries.c.merchant_id == principal.merchant_id,
            ledger_entries.c.livemode == principal.livemode,
            ledger_entries.c.account == account,
            ledger_entries.c.currency == currency,
        )
    )
    return int(total or 0)


def _capture_entries(intent: Mapping[Any, Any], amount_minor: int) -> list[Entry]:
    """Captured funds (of the intent's charge): the processor owes them to us, and we owe them to
    the merchant."""
    return [Entry(receivable(intent["connector"]), amount_minor), Entry(MERCHANT_PENDING.name, -amount_minor)]


def capture_writes(principal: Principal, intent: Mapping[Any, Any], charge_id: str, amount_minor: int) -> list[Write]:
    """`post_capture`'s writes, for a caller that writes them with others. A capture only credits
    the merchant, so it needs no never-negative check."""
    if amount_minor == 0:
        return []
    entries = _capture_entries(intent, amount_minor)
    return posting(principal, "charge", charge_id, Kind.CAPTURE, intent["currency"], entries)


async def post_capture(
    conn: AsyncConnection, principal: Principal, intent: RowMapping, charge_id: str, amount_minor: int
) -> str | None:
    if amount_minor == 0:
        return None  # authorized only, or a zero capture: no money moved
    entries = _capture_entries(intent, amount_minor)
    return await post(conn, principal, "charge", charge_id, Kind.CAPTURE, intent["currency"], entries)


async def post_refund(conn: AsyncConnection, principal: Principal, refund: RowMapping, connector: str) -> str:
    """A succeeded refund: paid out of the merchant's available balance through the processor."""
    amount_minor = refund["amount"]
    return await post(
        conn,
        principal,
        "refund",
        refund["id"],
        Kind.REFUND,
        refund["currency"],
        [Entry(MERCHANT_AVAILABLE.name, amount_minor), Entry(receivable(connector), -amount_minor)],
    )


async def post_fee(
    conn: AsyncConnection,
    principal: Principal,
    source_type: str,
    source_id: str,
    connector: str,
    currency: str,
    fee_minor: int,
) -> str | None:
    """The processor's fee, as its settlement report states it: kept out of what it pays us and
    borne by the merchant. A charge's fee comes out of that charge's pending funds; a fee on a
    refund (or a fee returned, negative) out of or into the available balance."""
    if fee_minor == 0:
        return None
    merchant = MERCHANT_PENDING if source_type == "charge" else MERCHANT_AVAILABLE
    entries = [Entry(merchant.name, fee_minor), Entry(receivable(connector), -fee_minor)]
    return await post(conn, principal, source_type, source_id, Kind.FEE, currency, entries)


async def post_settlement(
    conn: AsyncConnection, principal: Principal, charge_id: str, currency: str, net_minor: int
) -> str | None:
    """A charge's net funds (gross - fee) became payable: pending → available."""
    if net_minor <= 0:
        return None
    return await post(
        conn,
        principal,
        "charge",
        charge_id,
        Kind.SETTLE,
        currency,
        [Entry(MERCHANT_PENDING.name, net_minor), Entry(MERCHANT_AVAILABLE.name, -net_minor)],
    )


# ---------------------------------------------------------------------------------------------
# Balances


async def balance(conn: AsyncConnection, principal: Principal) -> dict[str, Any]:
    """Stripe's balance object, derived from the entries of the merchant's accounts."""
    rows = await conn.execute(
        sa.select(ledger_entries.c.account, ledger_entries.c.currency, sa.func.sum(ledger_entries.c.amount_minor))
        .where(
            ledger_entries.c.merchant_id == principal.merchant_id,
            ledger_entries.c.livemode == principal.livemode,
            ledger_entries.c.account.in_(MERCHANT_ACCOUNTS),
        )
        .group_by(ledger_entries.c.account, ledger_entries.c.currency)
        .order_by(ledger_entries.c.currency)
    )
    sums: dict[tuple[str, str], int] = {(r[0], r[1]): int(r[2]) for r in rows}
    currencies = sorted({currency for _, currency in sums})

    def side(account: str) -> list[dict[str, Any]]:
        # Credit-normal: what we owe the merchant is the negated signed sum.
        return [{"amount": -sums.get((account, c), 0), "currency": c} for c in currencies]

    return {
        "object": "balance",
        "available": side("merchant_available"),
        "pending": side("merchant_pending"),
        "livemode": principal.livemode,
    }


def _scope(principal: Principal) -> list[sa.ColumnElement[bool]]:
    return [
        ledger_transactions.c.merchant_id == principal.merchant_id,
        ledger_transactions.c.livemode == principal.livemode,
        ledger_transactions.c.kind.in_(LISTED_KINDS),
    ]


async def list_balance_transactions(conn: AsyncConnection, principal: Principal, page: PageRequest) -> Page:
    return await fetch_page(conn, ledger_transactions, _scope(principal), page)


async def retrieve_balance_transaction(conn: AsyncConnection, principal: Principal, txn_id: str) -> RowMapping:
    query = sa.select(ledger_transactions).where(*_scope(principal), ledger_transactions.c.id == txn_id)
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise ResourceMissing("balance_transaction", txn_id)
    return row


async def balance_transaction_views(
    conn: AsyncConnection, principal: Principal, rows: Sequence[RowMapping]
) -> list[dict[str, Any]]:
    """Stripe's balance_transaction objects: the amount is the change of what we owe the merchant;
    the processor's fee and the settlement of a charge show on that charge's transaction."""
    if not rows:
        return []
    t, e = ledger_transactions.c, ledger_entries.c
    sums = await conn.execute(
        sa.select(t.source_type, t.source_id, t.kind, t.created, sa.func.sum(e.amount_minor))
        .join(ledger_entries, sa.and_(e.merchant_id == t.merchant_id, e.transaction_id == t.id))
        .where(
            t.merchant_id == principal.merchant_id,
            t.source_id.in_([r["source_id"] for r in rows]),
            e.account.in_(MERCHANT_ACCOUNTS),
        )
        .group_by(t.source_type, t.source_id, t.kind, t.created)
    )
    related: dict[tuple[str, str, str], tuple[dt.datetime, int]] = {
        (source_type, source_id, kind): (created, -int(total)) for source_type, source_id, kind, created, total in sums
    }
    return [_view(row, related) for row in rows]


def _view(row: RowMapping, related: dict[tuple[str, str, str], tuple[dt.datetime, int]]) -> dict[str, Any]:
    source = (row["source_type"], row["source_id"])
    amount_minor = related.get((*source, row["kind"]), (row["created"], 0))[1]
    fee_minor = -related.get((*source, Kind.FEE), (row["created"], 0))[1]
    settled = related.get((*source, Kind.SETTLE))
    created = epoch_s(row["created"])
    category = "charge" if row["kind"] == Kind.CAPTURE else "refund"
    return {
        "id": row["id"],
        "object": "balance_transaction",
        "amount": amount_minor,
        "fee": fee_minor,
        "fee_details": (
            [{"amount": fee_minor, "currency": row["currency"], "description": "Processing fees", "type": "stripe_fee"}]
            if fee_minor
            else []
        ),
        "net": amount_minor - fee_minor,
        "currency": row["currency"],
        "type": category,
        "source": row["source_id"],
        # Refunds are paid out of the balance at once; a charge is pending until the processor's
        # settlement report makes its funds available (see `strongroom reconcile`).
        "status": "available" if settled or row["kind"] != Kind.CAPTURE else "pending",
        "available_on": epoch_s(settled[0]) if settled else created,
        "created": created,
        "description": None,
        "reporting_category": category,
    }


# ---------------------------------------------------------------------------------------------
# Trial balance


@dataclass
class CheckReport:
    transactions: int = 0
    entries: int = 0
    balances: dict[tuple[str, bool, str, str], int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def check(conn: AsyncConnection, *, merchant_id: str | None = None, batch: int = 10_000) -> CheckReport:
    """The trial balance: every transaction sums to zero per currency and has entries, every
    account is in the chart, and no never-negative account is below zero (balances recomputed
    from the entries)."""
    report = CheckReport()
    txn_where = [] if merchant_id is None else [ledger_transactions.c.merchant_id == merchant_id]
    entry_where = [] if merchant_id is None else [ledger_entries.c.merchant_id == merchant_id]
    report.transactions = int(
        await conn.scalar(sa.select(sa.func.count()).where(*txn_where).select_from(ledger_transactions)) or 0
    )
    report.entries = int(
        await conn.scalar(sa.select(sa.func.count()).where(*entry_where).select_from(ledger_entries)) or 0
    )
    e, t = ledger_entries.c, ledger_transactions.c
    unbalanced = await conn.execute(
        sa.select(e.merchant_id, e.transaction_id, e.currency, sa.func.sum(e.amount_minor))
        .where(*entry_where)
        .group_by(e.merchant_id, e.transaction_id, e.currency)
        .having(sa.func.sum(e.amount_minor) != 0)
        .limit(batch)
    )
    for m, txn, currency, total in unbalanced:
        report.problems.append(f"transaction {txn} of {m} does not sum to zero in {currency}: {total}")
    empty = await conn.execute(
        sa.select(t.merchant_id, t.id)
        .where(*txn_where, ~sa.exists().where(e.merchant_id == t.merchant_id, e.transaction_id == t.id))
        .limit(batch)
    )
    for m, txn in empty:
        report.problems.append(f"transaction {txn} of {m} has no entries")
    orphans = await conn.execute(
        sa.select(e.merchant_id, e.transaction_id)
        .where(*entry_where, ~sa.exists().where(t.merchant_id == e.merchant_id, t.id == e.transaction_id))
        .distinct()
        .limit(batch)
    )
    for m, txn in orphans:
        report.problems.append(f"entries of {m} name a missing transaction {txn}")
    balances = await conn.execute(
        sa.select(e.merchant_id, e.livemode, e.account, e.currency, sa.func.sum(e.amount_minor))
        .where(*entry_where)
        .group_by(e.merchant_id, e.livemode, e.account, e.currency)
    )
    for m, livemode, account, currency, total in balances:
        report.balances[(m, bool(livemode), account, currency)] = int(total)
        kind = account_type(account)
        if kind is None:
            report.problems.append(f"account {account} of {m} is not in the chart of accounts")
        elif kind.never_negative and normal_balance(kind, int(total)) < 0:
            mode = "live" if livemode else "test"
            report.problems.append(
                f"account {account} of {m} ({mode}, {currency}) is negative: {normal_balance(kind, int(total))}"
            )
    return report
