"""Processor settlement reports: reading them (for reconciliation) and writing them (the sandbox).

Two formats are read:

`stripe` — Stripe's "Balance change from activity" itemized report (`balance_change_from_activity.
itemized.*`) as downloaded: amounts in major units (`gross`, `fee`, `net`, e.g. `10.00`), currency
lower case, times `YYYY-MM-DD HH:MM:SS` in UTC. Columns used: `balance_transaction_id`,
`created_utc`, `available_on_utc` (optional), `currency`, `gross`, `fee`, `net`,
`reporting_category`, `source_id`, `charge_id` (optional). Other columns are ignored.

`generic` — for any other processor, one row per balance movement:

    id,type,created,available_on,currency,amount,fee,reference
    txn_1,charge,2026-11-24T10:00:00Z,2026-11-26T00:00:00Z,usd,1000,59,ch_abc
    txn_2,refund,2026-11-24T11:00:00Z,,usd,-400,0,re_def

`amount` and `fee` in integer minor units (a refund's amount is negative), `type` `charge` or
`refund` (other types are read and skipped), `reference` the processor's id of the charge or
refund (what the connector returned as its `processor_ref`), times ISO 8601 (UTC when no offset
is given), `available_on` optional.

A malformed report is refused as a whole with the line that is wrong: nothing is reconciled from
half a file.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum

from strongroom.errors import StrongroomError
from strongroom.money import Currency, format_minor, get_currency

STRIPE_COLUMNS = (
    "balance_transaction_id",
    "created_utc",
    "available_on_utc",
    "currency",
    "gross",
    "fee",
    "net",
    "reporting_category",
    "source_id",
    "charge_id",
    "description",
)
_STRIPE_REQUIRED: tuple[str, ...] = ("balance_transaction_id", "created_utc", "currency", "gross", "fee", "net")
_STRIPE_REQUIRED += ("reporting_category", "source_id")
GENERIC_COLUMNS = ("id", "type", "created", "available_on", "currency", "amount", "fee", "reference")


class ReportFormat(StrEnum):
    STRIPE = "stripe"
    GENERIC = "generic"


class Category(StrEnum):
    CHARGE = "charge"
    REFUND = "refund"
    OTHER = "other"  # payouts, adjustments…: read, reported as skipped


class ReportError(StrongroomError):
    """The report cannot be read; `line` is the 1-based line of the file (the header is line 1)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line


@dataclass(frozen=True)
class ReportLine:
    line: int  # 1-based line of the file
    processor_txn: str
    category: Category
    source_ref: str  # the processor's charge or refund id
    currency: str  # lower case ISO 4217
    gross_minor: int  # signed: a refund is negative
    fee_minor: int
    created: dt.datetime
    available_on: dt.datetime | None

    @property
    def net_minor(self) -> int:
        return self.gross_minor - self.fee_minor


def parse(text: str, report_format: ReportFormat) -> list[ReportLine]:
    reader = csv.DictReader(io.StringIO(text))
    header = tuple(reader.fieldnames or ())
    required = _STRIPE_REQUIRED if report_format is ReportFormat.STRIPE else GENERIC_COLUMNS[:3] + GENERIC_COLUMNS[4:]
    missing = [column for column in required if column not in header]
    if missing:
        raise ReportError(f"not a {report_format} report: missing columns {', '.join(missing)}", 1)
    read = _stripe_line if report_format is ReportFormat.STRIPE else _generic_line
    lines = [read(reader.line_num, row) for row in reader]
    seen: set[str] = set()
    for report_line in lines:
        if report_line.category is Category.CHARGE and not 0 <= report_line.fee_minor <= report_line.gross_minor:
            # Booked from the charge's own pending funds: a fee beyond the charge is not a fee.
            raise ReportError("a charge's fee must be between 0 and its gross amount", report_line.line)
        if report_line.processor_txn in seen:
            raise ReportError(f"transaction {report_line.processor_txn} appears twice", report_line.line)
        seen.add(report_line.processor_txn)
    return lines


def _stripe_line(line: int, row: dict[str, str]) -> ReportLine:
    currency = _currency(row["currency"], line)
    gross = _major_to_minor(row["gross"], currency, "gross", line)
    fee = _major_to_minor(row["fee"], currency, "fee", line)
    if gross - fee != _major_to_minor(row["net"], currency, "net", line):
        raise ReportError("net is not gross - fee", line)
    category = row["reporting_category"].strip()
    return ReportLine(
        line=line,
        processor_txn=_required(row, "balance_transaction_id", line),
        category=Category(category) if category in (Category.CHARGE, Category.REFUND) else Category.OTHER,
        source_ref=_required(row, "source_id", line),
        currency=currency.code.lower(),
        gross_minor=gross,
        fee_minor=fee,
        created=_time(row["created_utc"], "created_utc", line),
        available_on=_time(row["available_on_utc"], "available_on_utc", line) if row.get("available_on_utc") else None,
    )


def _generic_line(line: int, row: dict[str, str]) -> ReportLine:
    currency = _currency(row["currency"], line)
    kind = row["type"].strip()
    return ReportLine(
        line=line,
        processor_txn=_required(row, "id", line),
        category=Category(kind) if kind in (Category.CHARGE, Category.REFUND) else Category.OTHER,
        source_ref=_required(row, "reference", line),
        currency=currency.code.lower(),
        gross_minor=_integer(row["amount"], "amount", line),
        fee_minor=_integer(row["fee"], "fee", line),
        created=_time(row["created"], "created", line),
        available_on=_time(row["available_on"], "available_on", line) if row.get("available_on") else None,
    )


def _required(row: dict[str, str], column: str, line: int) -> str:
    value = (row.get(column) or "").strip()
    if not value:
        raise ReportError(f"{column} is empty", line)
    return value


def _currency(value: str | None, line: int) -> Currency:
    try:
        return get_currency((value or "").strip())
    except StrongroomError as exc:
        raise ReportError(f"unknown currency {(value or '')[:8]!r}", line) from exc


def _integer(value: str | None, column: str, line: int) -> int:
    text = (value or "").strip()
    if not text.lstrip("-").isdigit():
        raise ReportError(f"{column} must be an integer amount in minor units", line)
    return int(text)


def _major_to_minor(value: str | None, currency: Currency, column: str, line: int) -> int:
    try:
        amount = Decimal((value or "").strip().replace(",", ""))
    except InvalidOperation as exc:
        raise ReportError(f"{column} is not a number", line) from exc
    minor = amount.scaleb(currency.exponent)
    if not minor.is_finite() or minor != minor.to_integral_value():
        raise ReportError(f"{column} has more decimals than {currency.code} allows", line)
    return int(minor)


def _time(value: str | None, column: str, line: int) -> dt.datetime:
    text = (value or "").strip().replace("Z", "+00:00")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ReportError(f"{column} is not a date and time", line) from exc
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


# ---------------------------------------------------------------------------------------------
# Writing (the sandbox's settlement report)


@dataclass(frozen=True)
class Movement:
    """One balance movement at a processor, as a report writer receives it."""

    processor_txn: str
    category: Category
    source_ref: str
    charge_ref: str
    currency: str
    gross_minor: int
    fee_minor: int
    created: dt.datetime
    available_on: dt.datetime


def write_stripe(movements: Iterable[Movement], out: io.TextIOBase | io.StringIO) -> int:
    """Writes Stripe's itemized balance-change report; returns the number of data lines."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STRIPE_COLUMNS)
    count = 0
    for m in movements:
        currency = get_currency(m.currency)
        writer.writerow(
            (
                m.processor_txn,
                _stripe_time(m.created),
                _stripe_time(m.available_on),
                m.currency.lower(),
                format_minor(m.gross_minor, currency),
                format_minor(m.fee_minor, currency),
                format_minor(m.gross_minor - m.fee_minor, currency),
                m.category.value,
                m.source_ref,
                m.charge_ref,
                "",
            )
        )
        count += 1
    return count


def _stripe_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def period(lines: Sequence[ReportLine]) -> tuple[dt.datetime, dt.datetime] | None:
    """The span the report covers, from its own lines (whole seconds, as reports print them)."""
    if not lines:
        return None
    start = min(line.created for line in lines).replace(microsecond=0)
    end = max(line.created for line in lines).replace(microsecond=0) + dt.timedelta(seconds=1)
    return start, end
