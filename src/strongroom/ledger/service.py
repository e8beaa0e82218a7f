"""Journal postings and balances.

`post` writes one journal transaction and its entries in the CALLER's transaction, so a money
movement, its posting and its event commit together (ARCHITECTURE: data rules). It raises
`InvariantError` (never caught: a bug) unless the entries balance per currency, and the
database refuses a second posting for the same (source, kind) by a unique constraint.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.errors import InvariantError, ResourceMissing
from strongroom.ids import new_id
from strongroom.ledger.models import (
    MERCHANT_ACCOUNTS,
    MERCHANT_PENDING,
    Entry,
    Kind,
    account_type,
    normal_balance,
    receivable,
)
from strongroom.ledger.tables import ledger_entries, ledger_transactions
from strongroom.store.db import epoch_s, utcnow
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
    if len(entries) < 2:
        raise InvariantError(f"a journal transaction needs at least two entries ({kind} {source_id})")
    for entry in entries:
        if account_type(entry.account) is None:
            raise InvariantError(f"account {entry.account!r} is not in the chart of accounts")
    off = unbalanced_currencies((currency, e.amount_minor) for e in entries)
    if off:
        raise InvariantError(f"journal transaction for {kind} {source_id} does not balance: {off}")
    transaction_id = new_id("balance_transaction")
    await conn.execute(
        _INSERT_TRANSACTION,
        {
            "merchant_id": principal.merchant_id,
            "id": transaction_id,
            "livemode": principal.livemode,
            "created": utcnow(),
            "source_type": source_type,
            "source_id": source_id,
            "kind": kind,
            "currency": currency,
        },
    )
    await conn.execute(
        _INSERT_ENTRY,
        [
            {
                "merchant_id": principal.merchant_id,
                "transaction_id": transaction_id,
                "line": line,
                "livemode": principal.livemode,
                "account": e.account,
                "currency": currency,
                "amount_minor": e.amount_minor,
            }
            for line, e in enumerate(entries)
        ],
    )
    await _check_never_negative(conn, principal, currency, entries)
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


async def post_capture(
    conn: AsyncConnection, principal: Principal, intent: RowMapping, charge_id: str, amount_minor: int
) -> str | None:
    """Captured funds (of the intent's charge): the processor owes them to us, and we owe them to
    the merchant."""
    if amount_minor == 0:
        return None  # authorized only, or a zero capture: no money moved
    return await post(
        conn,
        principal,
        "charge",
        charge_id,
        Kind.CAPTURE,
        intent["currency"],
        [Entry(receivable(intent["connector"]), amount_minor), Entry(MERCHANT_PENDING.name, -amount_minor)],
    )


async def post_refund(conn: AsyncConnection, principal: Principal, refund: RowMapping, connector: str) -> str:
    """A succeeded refund: the merchant's pending balance pays it back through the processor."""
    amount_minor = refund["amount"]
    return await post(
        conn,
        principal,
        "refund",
        refund["id"],
        Kind.REFUND,
        refund["currency"],
        [Entry(MERCHANT_PENDING.name, amount_minor), Entry(receivable(connector), -amount_minor)],
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
    """Stripe's balance_transaction objects: the amount is the change of what we owe the merchant."""
    if not rows:
        return []
    sums = await conn.execute(
        sa.select(ledger_entries.c.transaction_id, sa.func.sum(ledger_entries.c.amount_minor))
        .where(
            ledger_entries.c.merchant_id == principal.merchant_id,
            ledger_entries.c.transaction_id.in_([r["id"] for r in rows]),
            ledger_entries.c.account.in_(MERCHANT_ACCOUNTS),
        )
        .group_by(ledger_entries.c.transaction_id)
    )
    owed = {txn_id: -int(total) for txn_id, total in sums}
    return [_view(row, owed.get(row["id"], 0)) for row in rows]


def _view(row: RowMapping, amount_minor: int) -> dict[str, Any]:
    created = epoch_s(row["created"])
    return {
        "id": row["id"],
        "object": "balance_transaction",
        "amount": amount_minor,
        "fee": 0,
        "fee_details": [],
        "net": amount_minor,
        "currency": row["currency"],
        "type": "charge" if row["kind"] == Kind.CAPTURE else "refund",
        "source": row["source_id"],
        "status": "pending",
        # No payout schedule yet: funds stay pending, and the date is the posting's own.
        "available_on": created,
        "created": created,
        "description": None,
        "reporting_category": "charge" if row["kind"] == Kind.CAPTURE else "refund",
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
