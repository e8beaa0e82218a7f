"""Reconciliation: a processor's settlement report, line by line, against the ledger.

Each charge or refund line of the report is looked up by the processor's reference (our charge
or refund that the connector created) and compared with the ledger's capture or refund posting
of it (the amount that reached `processor_receivable:<connector>`). The outcome of each line is
one of:

  matched               the ledger posted the same amount in the same currency
  missing_in_ledger     the processor moved money we never posted (or never heard of)
  amount_mismatch       both sides have it, with different amounts
  currency_mismatch     … or in different currencies
  missing_at_processor  the ledger posted a capture or refund through this connector within the
                        report's period that no line of the report accounts for
  skipped               payouts, adjustments and other lines that do not match a posting

A matched line then books what only the processor knows: its fee (`post_fee`) and, once the
line's `available_on` has passed, the charge's settlement from pending to available
(`post_settlement`). Both are idempotent on their source, so the same report (or an overlapping
one) can be reconciled again: the second run posts nothing twice, and a run after `available_on`
posts the settlements the first could not. The run and every non-matched line are stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.auth.models import Principal
from strongroom.ids import new_id
from strongroom.ledger import service
from strongroom.ledger.models import Kind, receivable
from strongroom.ledger.reports import Category, ReportFormat, ReportLine, period
from strongroom.ledger.tables import ledger_entries, ledger_transactions, reconciliation_items, reconciliation_runs
from strongroom.payments.references import Owned, charges_by_processor_ref, refunds_by_processor_ref
from strongroom.store.db import Database, utcnow


class Status(StrEnum):
    MATCHED = "matched"
    MISSING_IN_LEDGER = "missing_in_ledger"
    MISSING_AT_PROCESSOR = "missing_at_processor"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    SKIPPED = "skipped"


_CHUNK = 500
UNMATCHED = (Status.MISSING_IN_LEDGER, Status.MISSING_AT_PROCESSOR, Status.AMOUNT_MISMATCH, Status.CURRENCY_MISMATCH)


@dataclass(frozen=True)
class Posting:
    """A capture or refund posting of the ledger, as reconciliation sees it."""

    merchant_id: str
    livemode: bool
    transaction_id: str
    source_type: str
    source_id: str
    currency: str
    receivable_minor: int  # what it moved on the connector's receivable: + capture, - refund


@dataclass(frozen=True)
class Item:
    status: Status
    category: Category
    line: ReportLine | None = None
    posting: Posting | None = None


@dataclass
class Run:
    id: str
    connector: str
    period: tuple[dt.datetime, dt.datetime] | None
    items: list[Item] = field(default_factory=list)
    fees_posted: int = 0
    settlements_posted: int = 0

    def count(self, status: Status) -> int:
        return sum(1 for item in self.items if item.status is status)

    @property
    def unmatched(self) -> list[Item]:
        return [item for item in self.items if item.status in UNMATCHED]


async def reconcile(
    db: Database,
    connector: str,
    lines: Sequence[ReportLine],
    *,
    report_format: ReportFormat,
    report_bytes: bytes,
    span: tuple[dt.datetime, dt.datetime] | None = None,
    now: dt.datetime | None = None,
) -> Run:
    """`span` is the period the report covers (its report run's interval); by default the span of
    its own lines, to the second (reports print whole seconds, so a posting in the same second as
    the first or last line but outside the report's real interval may show as missing)."""
    now = now or utcnow()
    run = Run(id=new_id("reconciliation"), connector=connector, period=span or period(lines))
    async with db.read() as conn:
        charges = await charges_by_processor_ref(
            conn, connector, (ln.source_ref for ln in lines if ln.category is Category.CHARGE)
        )
        refunds = await refunds_by_processor_ref(
            conn, connector, (ln.source_ref for ln in lines if ln.category is Category.REFUND)
        )
        postings = await _postings(conn, connector, [*charges.values(), *refunds.values()], run.period)
    seen: set[tuple[str, str]] = set()
    for line in lines:
        owned = (charges if line.category is Category.CHARGE else refunds).get(line.source_ref)
        source_type = "charge" if line.category is Category.CHARGE else "refund"
        posting = postings.get((owned.merchant_id, source_type, owned.id)) if owned else None
        if posting is not None:
            seen.add((posting.merchant_id, posting.transaction_id))
        run.items.append(Item(_compare(line, posting), line.category, line, posting))
    for _, posting in sorted(postings.items()):
        if (posting.merchant_id, posting.transaction_id) not in seen:
            category = Category.CHARGE if posting.source_type == "charge" else Category.REFUND
            run.items.append(Item(Status.MISSING_AT_PROCESSOR, category, None, posting))
    for item in run.items:
        if item.status is Status.MATCHED and item.line is not None and item.posting is not None:
            await _book(db, run, connector, item.line, item.posting, now)
    async with db.tx() as conn:
        await _store(conn, run, report_format, report_bytes)
    return run


def _compare(line: ReportLine, posting: Posting | None) -> Status:
    if line.category is Category.OTHER:
        return Status.SKIPPED
    if posting is None:
        return Status.MISSING_IN_LEDGER
    if posting.currency != line.currency:
        return Status.CURRENCY_MISMATCH
    if posting.receivable_minor != line.gross_minor:
        return Status.AMOUNT_MISMATCH
    return Status.MATCHED


async def _postings(
    conn: AsyncConnection,
    connector: str,
    owned: Sequence[Owned],
    span: tuple[dt.datetime, dt.datetime] | None,
) -> dict[tuple[str, str, str], Posting]:
    """Capture and refund postings through `connector`: those the report's lines name, and every
    other one inside the report's period (the candidates for missing_at_processor)."""
    t, e = ledger_transactions.c, ledger_entries.c
    query = (
        sa.select(t.merchant_id, t.livemode, t.id, t.source_type, t.source_id, t.currency, e.amount_minor)
        .join(ledger_entries, sa.and_(e.merchant_id == t.merchant_id, e.transaction_id == t.id))
        .where(t.kind.in_((Kind.CAPTURE, Kind.REFUND)), e.account == receivable(connector))
    )
    ids = sorted({o.id for o in owned})
    selections: list[sa.ColumnElement[bool]] = [
        t.source_id.in_(ids[i : i + _CHUNK]) for i in range(0, len(ids), _CHUNK)
    ]
    if span is not None:
        selections.append(sa.and_(t.created >= span[0], t.created < span[1]))
    found: dict[tuple[str, str, str], Posting] = {}
    for selection in selections:
        for merchant_id, livemode, txn_id, source_type, source_id, currency, amount in await conn.execute(
            query.where(selection)
        ):
            found[(merchant_id, source_type, source_id)] = Posting(
                merchant_id, bool(livemode), txn_id, source_type, source_id, currency, int(amount)
            )
    return found


async def _book(db: Database, run: Run, connector: str, line: ReportLine, posting: Posting, now: dt.datetime) -> None:
    """The fee and (once available) the settlement of a matched line; each at most once ever."""
    principal = Principal(merchant_id=posting.merchant_id, livemode=posting.livemode, key_id="reconciliation")
    async with db.tx() as conn:
        if not await _posted(conn, posting, Kind.FEE) and await service.post_fee(
            conn, principal, posting.source_type, posting.source_id, connector, line.currency, line.fee_minor
        ):
            run.fees_posted += 1
    available = line.available_on is None or line.available_on <= now
    if line.category is not Category.CHARGE or not available:
        return
    async with db.tx() as conn:
        if not await _posted(conn, posting, Kind.SETTLE) and await service.post_settlement(
            conn, principal, posting.source_id, line.currency, line.net_minor
        ):
            run.settlements_posted += 1


async def _posted(conn: AsyncConnection, posting: Posting, kind: Kind) -> bool:
    # The unique constraint on (merchant, source, kind) is the guarantee; this check only spares a
    # rerun the failed insert.
    t = ledger_transactions.c
    query = sa.select(t.id).where(
        t.merchant_id == posting.merchant_id,
        t.source_type == posting.source_type,
        t.source_id == posting.source_id,
        t.kind == kind,
    )
    return (await conn.execute(query)).first() is not None


async def _store(conn: AsyncConnection, run: Run, report_format: ReportFormat, report_bytes: bytes) -> None:
    await conn.execute(
        reconciliation_runs.insert().values(
            id=run.id,
            created=utcnow(),
            connector=run.connector,
            report_format=report_format.value,
            report_sha256=hashlib.sha256(report_bytes).hexdigest(),
            period_start=run.period[0] if run.period else None,
            period_end=run.period[1] if run.period else None,
            lines=sum(1 for item in run.items if item.line is not None),
            matched=run.count(Status.MATCHED),
            missing_in_ledger=run.count(Status.MISSING_IN_LEDGER),
            missing_at_processor=run.count(Status.MISSING_AT_PROCESSOR),
            mismatched=run.count(Status.AMOUNT_MISMATCH) + run.count(Status.CURRENCY_MISMATCH),
        )
    )
    rows = [_item_row(run.id, number, item) for number, item in enumerate(run.items)]
    if rows:
        await conn.execute(reconciliation_items.insert(), rows)


def _item_row(run_id: str, number: int, item: Item) -> dict[str, object]:
    line, posting = item.line, item.posting
    return {
        "run_id": run_id,
        "item": number,
        "status": item.status.value,
        "report_line": line.line if line else None,
        "processor_txn": line.processor_txn if line else None,
        "category": item.category.value,
        "source_ref": line.source_ref if line else None,
        "merchant_id": posting.merchant_id if posting else None,
        "ledger_transaction_id": posting.transaction_id if posting else None,
        "ledger_amount": posting.receivable_minor if posting else None,
        "ledger_currency": posting.currency if posting else None,
        "report_amount": line.gross_minor if line else None,
        "report_fee": line.fee_minor if line else None,
        "report_currency": line.currency if line else None,
    }


def describe(item: Item) -> str:
    """One human line per item, for the CLI report."""
    line, posting = item.line, item.posting
    where = f"line {line.line} ({line.processor_txn}, {line.category} {line.source_ref})" if line else ""
    ours = (
        f"ledger {posting.transaction_id} ({posting.source_type} {posting.source_id} of {posting.merchant_id})"
        if posting
        else ""
    )
    if item.status is Status.MISSING_IN_LEDGER and line:
        return f"missing in ledger: {where}: {line.gross_minor} {line.currency}"
    if item.status is Status.MISSING_AT_PROCESSOR and posting:
        return f"missing at processor: {ours}: {posting.receivable_minor} {posting.currency}"
    if line and posting:
        return (
            f"{item.status.value.replace('_', ' ')}: {where}: report {line.gross_minor} {line.currency}, "
            f"{ours} {posting.receivable_minor} {posting.currency}"
        )
    return f"{item.status.value}: {where}"
