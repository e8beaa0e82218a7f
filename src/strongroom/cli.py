"""The `strongroom` command: serve, migrate, merchants, ledger."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import structlog
import typer

from strongroom.auth import service as auth_service
from strongroom.auth.models import NewMerchant
from strongroom.bench.cli import bench
from strongroom.ledger import commands as ledger_commands
from strongroom.ledger import service as ledger_service
from strongroom.ledger.service import CheckReport
from strongroom.settings import Settings, load_settings
from strongroom.store.db import Database
from strongroom.store.migrate import upgrade

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Strongroom payment platform")
merchants_app = typer.Typer(no_args_is_help=True, help="Merchant accounts")
app.add_typer(merchants_app, name="merchants")
ledger_app = typer.Typer(no_args_is_help=True, help="Double-entry ledger")
app.add_typer(ledger_app, name="ledger")
app.command("bench")(bench)
sandbox_app = typer.Typer(no_args_is_help=True, help="The built-in sandbox processor")
app.add_typer(sandbox_app, name="sandbox")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default .strongroom)")]


def _settings(data_dir: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = load_settings(**overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _configure_logging(settings.log_level)
    return settings


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(message)s")
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


async def _create_merchant(settings: Settings, name: str) -> NewMerchant:
    from strongroom.app import key_hasher

    db = Database(settings.effective_database_url)
    try:
        async with db.tx() as conn:
            return await auth_service.create_merchant(conn, key_hasher(settings), name)
    finally:
        await db.dispose()


async def _has_merchant(settings: Settings) -> bool:
    db = Database(settings.effective_database_url)
    try:
        async with db.read() as conn:
            return await auth_service.merchant_exists(conn)
    finally:
        await db.dispose()


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply database migrations to the configured database."""
    settings = _settings(data_dir)
    upgrade(settings.effective_database_url)
    typer.echo("migrations applied")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    data_dir: DataDir = None,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
) -> None:
    """Run the API server (SQLite, development keystore and sandbox processor by default)."""
    import os

    import uvicorn

    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)  # the embedded default migrates itself
    if not asyncio.run(_has_merchant(settings)):
        merchant = asyncio.run(_create_merchant(settings, "Test merchant"))
        typer.echo(f"Created test merchant {merchant.id}.")
        typer.echo(f"Its test secret key (shown once, store it now): {merchant.secret_key}")
    # Worker processes rebuild settings from the environment: pin the data dir and public URL there.
    os.environ["STRONGROOM_DATA_DIR"] = str(settings.data_dir.resolve())
    os.environ["STRONGROOM_PUBLIC_URL"] = f"http://{host}:{port}"
    typer.echo(f"Strongroom listening on http://{host}:{port}")
    uvicorn.run(
        "strongroom.app:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,
    )


@merchants_app.command("create")
def merchants_create(
    name: str,
    as_json: Annotated[bool, typer.Option("--json", help="Print {id, secret_key} as JSON")] = False,
    data_dir: DataDir = None,
) -> None:
    """Create a merchant and print its id and a new test secret key (shown once)."""
    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
    merchant = asyncio.run(_create_merchant(settings, name))
    if as_json:
        typer.echo(json.dumps({"id": merchant.id, "secret_key": merchant.secret_key}))
    else:
        typer.echo(f"merchant: {merchant.id}\nsecret key (shown once): {merchant.secret_key}")


async def _ledger_check(settings: Settings) -> CheckReport:
    db = Database(settings.effective_database_url)
    try:
        async with db.read() as conn:
            return await ledger_service.check(conn)
    finally:
        await db.dispose()


@ledger_app.command("check")
def ledger_check(data_dir: DataDir = None) -> None:
    """Trial balance: recompute every balance from the entries and verify every journal transaction
    sums to zero per currency. Exits 1 with a report on any discrepancy."""
    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
    report = asyncio.run(_ledger_check(settings))
    typer.echo(f"ledger: {report.transactions} transactions, {report.entries} entries, {len(report.balances)} balances")
    if not report.ok:
        typer.echo(f"ledger check FAILED: {len(report.problems)} discrepancies", err=True)
        for problem in report.problems:
            typer.echo(f"  {problem}", err=True)
        raise typer.Exit(1)
    typer.echo("ledger check ok: every transaction sums to zero per currency; no account below zero")


@app.command("reconcile")
def reconcile(
    report: Annotated[Path, typer.Argument(help="Settlement report (CSV)", exists=True, dir_okay=False)],
    connector: ledger_commands.ConnectorOption,
    report_format: ledger_commands.FormatOption = ledger_commands.ReportFormat.STRIPE,
    since: Annotated[datetime | None, typer.Option(help="Start of the report's interval (UTC)")] = None,
    until: Annotated[datetime | None, typer.Option(help="End of the report's interval, exclusive (UTC)")] = None,
    data_dir: DataDir = None,
) -> None:
    """Reconcile a processor settlement report against the ledger; exit 1 if anything is unmatched.
    Without --since/--until the interval is the span of the report's own lines."""
    ledger_commands.run_reconcile(_settings(data_dir), report, connector, report_format, since, until)


@sandbox_app.command("settlement-report")
def sandbox_settlement_report(
    out: Annotated[Path, typer.Option("--out", help="CSV file to write")],
    since: Annotated[datetime | None, typer.Option(help="First instant covered (UTC)")] = None,
    until: Annotated[datetime | None, typer.Option(help="End of the period, exclusive (UTC)")] = None,
    available_after_days: Annotated[int, typer.Option(min=0, help="Days until funds become available")] = 0,
    data_dir: DataDir = None,
) -> None:
    """Write the sandbox processor's settlement report in Stripe's itemized balance-change format."""
    ledger_commands.run_settlement_report(_settings(data_dir), out, since, until, available_after_days)


def main() -> None:
    app()
