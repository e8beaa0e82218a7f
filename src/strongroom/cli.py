"""The `strongroom` command: serve, migrate, merchants, ledger."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import structlog
import typer
from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom import redact, tls
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
keys_app = typer.Typer(no_args_is_help=True, help="Vault keys: versions, what they protect, rotation")
app.add_typer(keys_app, name="keys")
certs_app = typer.Typer(no_args_is_help=True, help="TLS certificates")
app.add_typer(certs_app, name="certs")
app.command("bench")(bench)
sandbox_app = typer.Typer(no_args_is_help=True, help="The built-in sandbox processor")
app.add_typer(sandbox_app, name="sandbox")
worker_app = typer.Typer(help="Background jobs, leased so that each runs once across workers")
app.add_typer(worker_app, name="worker")
vault_app = typer.Typer(no_args_is_help=True, help="The card vault as its own process")
app.add_typer(vault_app, name="vault")

T = TypeVar("T")

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="Data directory (default .strongroom)")]
BehindTlsProxy = Annotated[
    bool,
    typer.Option("--behind-tls-proxy", help="TLS ends at a proxy in front: listen in plain HTTP outside development"),
]


def _refuse_plain_http(settings: Settings, policy: tls.TlsPolicy | None, behind_tls_proxy: bool) -> None:
    """PCI DSS 4.2.1: outside development a listener speaks TLS, or is told that TLS ends in front."""
    if policy is None and not (settings.development or behind_tls_proxy or settings.http.behind_tls_proxy):
        typer.echo(
            "error: outside development the server listens with TLS only: give --tls-cert and --tls-key, "
            "or --behind-tls-proxy (STRONGROOM_HTTP__BEHIND_TLS_PROXY) when TLS ends at a proxy in front",
            err=True,
        )
        raise typer.Exit(2)


def _settings(data_dir: Path | None) -> Settings:
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    settings = load_settings(**overrides)
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _configure_logging(settings.log_level)
    return settings


def _configure_logging(level: str) -> None:
    """JSON logs through structlog, plain ones through the standard library; in both, PCI DSS
    3.4.1: every PAN is masked (exception text included) before it is written. Called again in
    each worker after uvicorn has built its handlers, so theirs get the filter too."""
    logging.basicConfig(level=level.upper(), format="%(message)s")
    redact.install_logging_filter()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact.redact_event,
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


async def _read(settings: Settings, query: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """One read on a database opened for it (CLI commands run once and exit)."""
    db = Database(settings.effective_database_url)
    try:
        async with db.read() as conn:
            return await query(conn)
    finally:
        await db.dispose()


async def _has_merchant(settings: Settings) -> bool:
    return await _read(settings, auth_service.merchant_exists)


@app.command()
def migrate(data_dir: DataDir = None) -> None:
    """Apply database migrations to the configured database."""
    settings = _settings(data_dir)
    upgrade(settings.effective_database_url)
    typer.echo("migrations applied")


@worker_app.callback(invoke_without_command=True)
def worker(
    ctx: typer.Context,
    data_dir: DataDir = None,
    once: Annotated[bool, typer.Option("--once", help="Run the jobs due now, then exit")] = False,
) -> None:
    """Run background jobs (recovery of unknown outcomes, purges, key rotation) until SIGTERM.
    Any number may run: each job is leased to one of them at a time."""
    if ctx.invoked_subcommand is not None:
        return
    from strongroom.app import run_worker

    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
    ran = asyncio.run(run_worker(settings, once=once))
    if once:
        typer.echo(f"{ran} jobs run")


@worker_app.command("status")
def worker_status(data_dir: DataDir = None) -> None:
    """Each job: state, next run, runs, failed attempts and the last error."""
    from strongroom.worker import service as jobs

    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)

    for job in asyncio.run(_read(settings, jobs.listing)):
        every = f"every {job.interval_s:g}s" if job.interval_s is not None else "once"
        line = f"{job.kind:<20} {job.state.value:<10} {every:<14} next {job.run_at:%Y-%m-%d %H:%M:%S}Z"
        line += f" runs {job.runs} failed attempts {job.attempts}"
        typer.echo(line + (f" last error: {job.last_error}" if job.last_error else ""))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8080,
    data_dir: DataDir = None,
    workers: Annotated[int, typer.Option(help="Worker processes")] = 1,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate chain (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM)")] = None,
    behind_tls_proxy: BehindTlsProxy = False,
) -> None:
    """Run the API server (SQLite, development keystore and sandbox processor by default).
    With --tls-cert and --tls-key it speaks TLS only: 1.3 unless http.tls_min_version is "1.2".
    Outside development (STRONGROOM_DEVELOPMENT=false) it needs TLS or --behind-tls-proxy."""
    import os

    settings = _settings(data_dir)
    try:
        http = settings.http
        policy = tls.listener_policy(tls_cert or http.tls_cert_file, tls_key or http.tls_key_file, http.tls_min_version)
    except tls.TlsConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _refuse_plain_http(settings, policy, behind_tls_proxy)
    scheme = "https" if policy is not None else "http"
    if settings.database_url is None:
        upgrade(settings.effective_database_url)  # the embedded default migrates itself
    # Production creates no merchant by itself: an operator does, with `merchants create`.
    if settings.development and not asyncio.run(_has_merchant(settings)):
        merchant = asyncio.run(_create_merchant(settings, "Test merchant"))
        typer.echo(f"Created test merchant {merchant.id}.")
        typer.echo(f"Its test secret key (shown once, store it now): {merchant.secret_key}")
    # Worker processes rebuild settings from the environment: pin the data dir and public URL there.
    os.environ["STRONGROOM_DATA_DIR"] = str(settings.data_dir.resolve())
    # The address clients reach (3-D Secure and card-form links) is the configured one; the bind
    # address only stands in when none is configured.
    if "public_url" not in settings.model_fields_set:
        os.environ["STRONGROOM_PUBLIC_URL"] = f"{scheme}://{host}:{port}"
    typer.echo(f"Strongroom listening on {scheme}://{host}:{port}")
    _run_server("strongroom.app:app_from_environment", host, port, workers, settings, policy)


def _run_server(
    factory: str, host: str, port: int, workers: int, settings: Settings, policy: tls.TlsPolicy | None
) -> None:
    import uvicorn

    from strongroom import workers as worker_processes

    options: dict[str, Any] = dict(
        app=factory,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        # uvicorn replaces its handlers from this dictionary, in this process and in each worker.
        log_config=redact.with_redaction(uvicorn.config.LOGGING_CONFIG),
        access_log=False,
        server_header=False,
        # Longer than clients keep idle connections (httpx: 5 s, uvicorn's own default): a server
        # that closes an idle connection just as the client reuses it makes the client see a reset
        # with no answer (seen once in a 10x surge). nginx's default, 75 s.
        timeout_keep_alive=75,
        # Pickled into each spawned worker; it builds our TLS context, not uvicorn's default one.
        ssl_context_factory=tls.uvicorn_factory(policy) if policy is not None else None,
    )
    if workers > 1:
        # Each worker on a socket of its own (SO_REUSEPORT): the kernel spreads connections.
        worker_processes.serve(uvicorn.Config(**options))
    else:
        uvicorn.run(**options)


@certs_app.command("dev")
def certs_dev(
    out: Annotated[Path, typer.Option("--out", help="Directory for cert.pem and key.pem")],
    host: Annotated[list[str] | None, typer.Option("--host", help="Extra DNS name or IP address (repeatable)")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing certificate and key")] = False,
) -> None:
    """Generate a self-signed development certificate (ECDSA P-256) for localhost, 127.0.0.1, ::1
    and each --host, and its key (0600). Not for production: clients must trust it by hand."""
    try:
        created = tls.write_dev_certificate(out, host or (), overwrite=force)
    except tls.TlsConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"certificate: {created.cert_file}")
    typer.echo(f"key (0600):  {created.key_file}")
    typer.echo(f"hosts: {', '.join(created.hosts)}; valid until {created.not_after:%Y-%m-%d}")
    typer.echo(f"serve with: strongroom serve --tls-cert {created.cert_file} --tls-key {created.key_file}")


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


@keys_app.command("status")
def keys_status(data_dir: DataDir = None) -> None:
    """Each key-encryption key version, what it protects, and rotation progress."""
    from strongroom.vault import rotation

    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
    for line in asyncio.run(rotation.run(settings, rotation.status_lines)):
        typer.echo(line)


@keys_app.command("rotate")
def keys_rotate(data_dir: DataDir = None) -> None:
    """New KEK version in the keystore, every DEK re-wrapped under it, cards re-encrypted under fresh
    DEKs, unreferenced versions destroyed. Online; after a crash, rerun it to continue."""
    from strongroom.vault import rotation

    settings = _settings(data_dir)
    if settings.database_url is None:
        upgrade(settings.effective_database_url)
    report = asyncio.run(rotation.run(settings, lambda vault: rotation.rotate(vault, settings.vault)))
    verb = "rotated to" if report.started else "continued rotation to"
    typer.echo(
        f"{verb} KEK v{report.kek_version}: {report.rewrapped} DEKs re-wrapped, {report.reencrypted} cards "
        f"re-encrypted, {report.deks_destroyed} DEKs and KEK versions {report.keks_destroyed or 'none'} destroyed"
    )
    if report.unreadable:
        typer.echo(f"{report.unreadable} items failed their integrity check and were left in place", err=True)
        raise typer.Exit(1)


@vault_app.command("serve")
def vault_serve(
    host: Annotated[str, typer.Option(help="Interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8081,
    data_dir: DataDir = None,
    tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="TLS certificate chain (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="TLS private key (PEM)")] = None,
    behind_tls_proxy: BehindTlsProxy = False,
) -> None:
    """Run the vault (the cardholder-data environment) as its own process, for an api configured
    with STRONGROOM_VAULT__URL. Needs STRONGROOM_VAULT__SERVICE_SECRET (shared with the api);
    keeps its cards in STRONGROOM_VAULT__DATABASE_URL (its own database and credentials)."""
    import os

    settings = _settings(data_dir)
    if settings.vault.service_secret is None or len(settings.vault.service_secret.get_secret_value()) < 32:
        typer.echo("error: STRONGROOM_VAULT__SERVICE_SECRET must be set (at least 32 bytes)", err=True)
        raise typer.Exit(2)
    try:
        policy = tls.listener_policy(tls_cert, tls_key, settings.http.tls_min_version)
    except tls.TlsConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    _refuse_plain_http(settings, policy, behind_tls_proxy)
    vault_database = settings.vault.database_url or settings.effective_database_url
    upgrade(vault_database)  # its own database: the vault migrates it itself
    os.environ["STRONGROOM_DATA_DIR"] = str(settings.data_dir.resolve())
    scheme = "https" if policy is not None else "http"
    typer.echo(f"Strongroom vault listening on {scheme}://{host}:{port}")
    # One process: the channel's replay cache and the CVC cache live in it.
    _run_server("strongroom.api.vault_service:vault_app_from_environment", host, port, 1, settings, policy)


def main() -> None:
    app()
