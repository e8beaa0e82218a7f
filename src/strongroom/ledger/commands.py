"""`strongroom reconcile` and `strongroom sandbox settlement-report`: the reconciliation loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
from pathlib import Path
from typing import Annotated

import typer

from strongroom.connectors.sandbox.settlement import settlement_movements
from strongroom.ledger.reconcile import Run, Status, describe, reconcile
from strongroom.ledger.reports import Movement, ReportError, ReportFormat, ReportLine, parse, write_stripe

__all__ = ["ConnectorOption", "FormatOption", "ReportFormat", "run_reconcile", "run_settlement_report"]
from strongroom.settings import Settings
from strongroom.store.db import Database, as_utc
from strongroom.store.migrate import upgrade

ConnectorOption = Annotated[str, typer.Option("--connector", help="Connector whose report this is (e.g. sandbox)")]
FormatOption = Annotated[ReportFormat, typer.Option("--format", help="Report format: stripe or generic")]


def run_reconcile(
    settings: Settings,
    report: Path,
    connector: str,
    report_format: ReportFormat = ReportFormat.STRIPE,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> None:
    """Match a processor settlement report line by line against the ledger. Prints matched,
    missing-in-ledger, missing-at-processor and mismatched lines, stores the run, posts the
    processor's fees and the settlements that became available; exits 1 if anything is unmatched
    and 2 if the report cannot be read."""
    raw = report.read_bytes()
    try:
        lines = parse(raw.decode("utf-8-sig"), report_format)
    except (ReportError, UnicodeDecodeError) as exc:
        typer.echo(f"reconcile: cannot read {report}: {exc}", err=True)
        raise typer.Exit(2) from exc
    span = None
    if since is not None or until is not None:
        if since is None or until is None:
            typer.echo("reconcile: --since and --until go together", err=True)
            raise typer.Exit(2)
        span = (as_utc(since), as_utc(until))
    _migrate_embedded(settings)
    result = asyncio.run(_reconcile(settings, connector, lines, report_format, raw, span))
    _print(result)
    if result.unmatched:
        raise typer.Exit(1)


async def _reconcile(
    settings: Settings,
    connector: str,
    lines: list[ReportLine],
    report_format: ReportFormat,
    raw: bytes,
    span: tuple[dt.datetime, dt.datetime] | None,
) -> Run:
    db = Database(settings.effective_database_url)
    try:
        return await reconcile(db, connector, lines, report_format=report_format, report_bytes=raw, span=span)
    finally:
        await db.dispose()


def _print(run: Run) -> None:
    counts = ", ".join(f"{status.value.replace('_', ' ')} {run.count(status)}" for status in Status)
    typer.echo(f"reconciliation {run.id} ({run.connector}): {counts}")
    typer.echo(f"posted {run.fees_posted} fees and {run.settlements_posted} settlements")
    for item in run.unmatched:
        typer.echo(f"  {describe(item)}", err=True)
    if run.unmatched:
        typer.echo(f"reconciliation FAILED: {len(run.unmatched)} lines unmatched", err=True)
    else:
        typer.echo("reconciliation ok: every line matched")


def run_settlement_report(
    settings: Settings, out: Path, since: dt.datetime | None, until: dt.datetime | None, available_after_days: int
) -> None:
    """Write the sandbox processor's settlement report (Stripe's itemized balance-change CSV)."""
    _migrate_embedded(settings)
    movements = asyncio.run(_movements(settings, since, until, dt.timedelta(days=available_after_days)))
    buffer = io.StringIO()
    count = write_stripe(movements, buffer)
    out.write_text(buffer.getvalue(), encoding="utf-8")
    typer.echo(f"wrote {count} lines to {out}")


async def _movements(
    settings: Settings, since: dt.datetime | None, until: dt.datetime | None, after: dt.timedelta
) -> list[Movement]:
    db = Database(settings.effective_database_url)
    try:
        return await settlement_movements(
            db, since=as_utc(since) if since else None, until=as_utc(until) if until else None, available_after=after
        )
    finally:
        await db.dispose()


def _migrate_embedded(settings: Settings) -> None:
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
