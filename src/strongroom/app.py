"""ASGI app factory: wires routers, middleware and the lifespan (engine, keys, background work)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import os
import secrets
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import sqlalchemy as sa
import structlog
from fastapi import FastAPI
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from strongroom import __version__, ratelimit
from strongroom.api import direct, docs, headers, http, openapi
from strongroom.api import errors as api_errors
from strongroom.api.auth import log_failed_authentication
from strongroom.api.errors import error_response
from strongroom.api.http import Services
from strongroom.auth.service import KeyHasher, PrincipalCache
from strongroom.connectors.routing import Router
from strongroom.connectors.sandbox import SandboxConnector, SandboxProcessor
from strongroom.connectors.sandbox.connector import SANDBOX_ORIGIN
from strongroom.connectors.sandbox.http import SandboxHttp
from strongroom.errors import AuthenticationFailed, Overloaded
from strongroom.events import routes as event_routes
from strongroom.idempotency import service as idempotency
from strongroom.ledger import routes as ledger_routes
from strongroom.payments import (
    recovery,
    retention,
    routes,
    routes_customers,
    routes_elements,
    routes_sandbox,
    routes_tokens,
)
from strongroom.payments.context import PaymentsContext
from strongroom.sensitive import Secret
from strongroom.settings import Settings
from strongroom.store.db import Database
from strongroom.store.group import GroupCommit
from strongroom.vault import rotation
from strongroom.vault.interface import CardVault
from strongroom.vault.keystore import open_keystore
from strongroom.vault.relay import Allowlist, CardRelay, Relay
from strongroom.vault.remote import RemoteRelay, RemoteVault
from strongroom.vault.service import CvcCache, Vault
from strongroom.worker.runner import Periodic, Worker

log = structlog.get_logger(__name__)

REQUESTS = Counter("strongroom_http_requests_total", "HTTP requests", ["method", "route", "status"])
SHED = Counter("strongroom_http_shed_total", "API requests shed by admission control")
LATENCY = Histogram("strongroom_http_request_seconds", "HTTP request latency", ["method", "route"])


def _secret_file(path: Path) -> bytes:
    """A development secret: 32 random bytes in a 0600 file, created on first use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def key_hasher(settings: Settings) -> KeyHasher:
    configured = settings.auth.key_hash_secret
    if configured is not None:
        return KeyHasher(Secret(configured.get_secret_value().encode()))
    if not settings.development:
        raise RuntimeError("STRONGROOM_AUTH__KEY_HASH_SECRET must be set outside development mode")
    return KeyHasher(Secret(_secret_file(settings.data_dir / "keys" / "api-key-hash.key")))


def build_services(settings: Settings, db: Database, public_url: str) -> Services:
    sandbox = SandboxProcessor(
        db,
        group_commit_max=settings.database.group_commit_max,
        group_commit_turns=settings.database.group_commit_gather_turns,
    )
    vault, relay = _vault_and_relay(settings, db, sandbox)
    router = Router(sandbox=SandboxConnector(sandbox, relay, url=settings.payments.sandbox_url))
    payments = PaymentsContext(
        db=db,
        vault=vault,
        router=router,
        settings=settings.payments.model_copy(update={"failpoint_allowed": settings.development}),
        lock_timeout_s=settings.idempotency.lock_timeout_s,
        public_url=public_url.rstrip("/"),
        commits=GroupCommit(
            db,
            max_batch=settings.database.group_commit_max,
            max_writers=settings.database.group_commit_writers,
            gather_turns=settings.database.group_commit_gather_turns,
        ),
    )
    return Services(
        settings=settings,
        db=db,
        hasher=key_hasher(settings),
        payments=payments,
        sandbox=sandbox,
        principals=PrincipalCache(settings.auth.key_cache_ttl_s),
        relay=relay,
        limiter=ratelimit.build(settings),
    )


def _vault_and_relay(settings: Settings, db: Database, sandbox: SandboxProcessor) -> tuple[CardVault, CardRelay]:
    """In-process by default; across the signed channel when the vault runs as its own process
    (`vault.url`). Either way card data reaches processors only through the vault's relay."""
    if settings.vault.url:
        if settings.vault.service_secret is None:
            raise RuntimeError("STRONGROOM_VAULT__URL needs STRONGROOM_VAULT__SERVICE_SECRET")
        secret = Secret(settings.vault.service_secret.get_secret_value().encode())
        ca = settings.vault.tls_ca_file
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca)) if ca else True
        remote = RemoteVault(
            settings.vault.url,
            secret,
            timeout_s=settings.payments.processor_timeout_s,
            verify=verify,
            allow_http=settings.development,
        )
        return remote, RemoteRelay(remote)
    cvcs = CvcCache(settings.vault.cvc_ttl_s, settings.vault.cvc_cache_max)
    vault = Vault(db, open_keystore(settings), cvcs, settings.vault)
    # The sandbox is a local test processor, reached in-process.
    relay = Relay(
        vault,
        db,
        Allowlist(settings.vault.relay_allowlist, local_test_origins=[SANDBOX_ORIGIN]),
        timeout_s=settings.payments.processor_timeout_s,
        local_apps={SANDBOX_ORIGIN: SandboxHttp(sandbox)},
        group_commit_max=settings.database.group_commit_max,
        group_commit_turns=settings.database.group_commit_gather_turns,
    )
    return vault, relay


def app_from_environment() -> FastAPI:
    """The uvicorn factory used by `strongroom serve` (settings from STRONGROOM_* variables)."""
    from strongroom.cli import _configure_logging
    from strongroom.settings import load_settings

    settings = load_settings()
    _configure_logging(settings.log_level)
    app = create_app(settings)
    _tune_gc()
    return app


# Python's cyclic collector by default runs every 700 allocations, and every tenth or hundredth of
# those walks older generations: under load a request allocates thousands of short-lived objects,
# and the collections showed as a fifth of the p99 latency. Objects alive at start-up (modules,
# routes, compiled statements) are frozen out of every collection, and collections run less often.
# Measured (2 workers, 32 clients, wrk, two runs each): 314/329 payments/s and p99 253/209 ms with
# the defaults, 333/366 and p99 148/133 ms with these.
_GC_THRESHOLDS = (20_000, 50, 100)


def _tune_gc() -> None:
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)


def _runs_worker_in_process(settings: Settings) -> bool:
    configured = settings.worker.in_process
    return settings.development if configured is None else configured


def periodic_jobs(settings: Settings, services: Services) -> list[Periodic]:
    """The system's periodic jobs, run by whichever worker leases each (`strongroom worker`, or
    the api process itself on the embedded default)."""
    ctx = services.payments
    db = services.db
    idem = settings.idempotency
    # PCI DSS 3.2.1: unused tokens, orphaned cards and expired card-form sessions.
    purge = retention.Purge(db, settings.retention, vault_in_process=isinstance(ctx.vault, Vault))
    jobs = [
        Periodic("recovery", settings.payments.recovery_interval_s, lambda: recovery.sweep(ctx)),
        Periodic(
            "idempotency_purge",
            idem.purge_interval_s,
            lambda: idempotency.purge_expired(db, ttl_s=idem.ttl_s, batch=idem.purge_batch),
        ),
        Periodic("retention_purge", settings.retention.purge_interval_s, purge.run),
    ]
    vault = ctx.vault
    if settings.vault.rotation_enabled and isinstance(vault, Vault):
        # PCI DSS 3.7.4 (SECURITY.md P6): the KEK is rotated when its crypto-period ends.
        vault_settings = settings.vault
        rotate = Periodic(
            "key_rotation", vault_settings.rotation_interval_s, lambda: rotation.tick(vault, vault_settings)
        )
        jobs.append(rotate)
    return jobs


def open_database(settings: Settings) -> Database:
    return Database(
        settings.effective_database_url,
        pool_size=settings.database.pool_size,
        pool_timeout_s=settings.database.pool_timeout_s,
        raw_pool_size=settings.database.raw_pool_size,
        read_gather_turns=settings.database.group_commit_gather_turns,
        flush_max_wait_s=settings.database.flush_max_wait_s,
    )


async def close_services(services: Services) -> None:
    await services.limiter.aclose()
    if services.relay is not None:
        await services.relay.aclose()
    vault = services.payments.vault
    if isinstance(vault, RemoteVault):
        await vault.aclose()
    vault.close()
    await services.db.dispose()


async def run_worker(settings: Settings, *, once: bool = False) -> int:
    """`strongroom worker`: the periodic jobs until SIGTERM or SIGINT (or one batch with `once`);
    the number of jobs run."""
    services = build_services(settings, open_database(settings), settings.public_url)
    worker = Worker(services.db, settings.worker, periodic=periodic_jobs(settings, services))
    try:
        if isinstance(services.payments.vault, Vault):
            await services.payments.vault.keys.warm()
        await worker.register()
        if once:
            return await worker.run_once()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        log.info("worker.started", owner=worker.owner)
        worker.start()
        await stopping.wait()
        await worker.stop()
        log.info("worker.stopped", owner=worker.owner)
        return 0
    finally:
        await close_services(services)


def create_app(settings: Settings, *, background: bool = True) -> FastAPI:
    public_url = settings.public_url

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = open_database(settings)
        app.state.services = build_services(settings, db, public_url)
        if isinstance(app.state.services.payments.vault, Vault):
            await app.state.services.payments.vault.keys.warm()
        worker = None
        if background and _runs_worker_in_process(settings):
            worker = Worker(db, settings.worker, periodic=periodic_jobs(settings, app.state.services))
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            await close_services(app.state.services)

    app = FastAPI(
        title="Strongroom",
        version=__version__,
        description="Stripe-compatible payments API",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,  # FastAPI's loads swagger-ui from a CDN: api.docs serves our own
        redoc_url=None,
    )
    api_errors.install(app)
    routers = (
        routes.router,
        routes_customers.router,
        event_routes.router,
        ledger_routes.router,
        routes_sandbox.router,
        routes_tokens.router,
        routes_elements.router,
    )
    for router in routers:
        app.include_router(router)
    if settings.development and settings.payments.sandbox_url.rstrip("/") != SANDBOX_ORIGIN:
        # The sandbox processor's endpoint for a vault running as its own process (its relay
        # reaches it over loopback); development only, and only when configured.
        app.mount("/sandbox", _sandbox_endpoint)
    _operational(app, settings, direct.table(routers))
    openapi.install(app)
    docs_enabled = settings.http.docs_enabled
    if docs_enabled or (docs_enabled is None and settings.development):
        docs.install(app)
    return app


async def _sandbox_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    await SandboxHttp(scope["app"].state.services.sandbox)(scope, receive, send)


def _operational(app: FastAPI, settings: Settings, direct_routes: dict[tuple[str, str], APIRoute]) -> None:
    app.add_middleware(direct.Direct, routes=direct_routes)  # innermost: inside metrics and admission
    app.add_middleware(_Admission, max_inflight=settings.http.max_inflight)
    app.add_middleware(_Observe)
    app.add_middleware(headers.SecurityHeaders)  # outermost: shed requests get them too

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", include_in_schema=False)
    async def readyz(request: Request) -> JSONResponse:
        try:
            async with request.app.state.services.db.read() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except Exception:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ready"})

    token = settings.http.metrics_token
    if token is None and not settings.development:
        return  # production without a token: /metrics is not served at all
    expected = b"Bearer " + token.get_secret_value().encode() if token is not None else None

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        if expected is not None:
            presented = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(presented, expected):
                failed = AuthenticationFailed("Invalid metrics token.")
                log_failed_authentication(request, None, failed, kind="metrics", reason="invalid_token")
                return error_response(failed)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class _Observe:
    """Request metrics and a Request-Id header, as plain ASGI (Starlette's BaseHTTPMiddleware
    costs a task and a queue per request on the hot path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"request-id", http.request_id().encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            REQUESTS.labels(scope["method"], template, str(status)).inc()
            LATENCY.labels(scope["method"], template).observe(time.perf_counter() - started)


class _Admission:
    """Sheds API requests beyond `max_inflight` per process with 503 + Retry-After before they do
    any work, so a surge is answered at once instead of queueing into timeouts."""

    def __init__(self, app: ASGIApp, max_inflight: int) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight:
            SHED.inc()
            await error_response(Overloaded())(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1
