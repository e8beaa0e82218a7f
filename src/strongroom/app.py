"""ASGI app factory: wires routers, middleware and the lifespan (engine, keys, background work)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
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

from strongroom import __version__
from strongroom.api import direct, http, openapi
from strongroom.api import errors as api_errors
from strongroom.api.errors import error_response
from strongroom.api.http import Services
from strongroom.auth.service import KeyHasher, PrincipalCache
from strongroom.background import every
from strongroom.connectors.routing import Router
from strongroom.connectors.sandbox import SandboxConnector, SandboxProcessor
from strongroom.connectors.sandbox.connector import SANDBOX_ORIGIN
from strongroom.connectors.sandbox.http import SandboxHttp
from strongroom.errors import Overloaded
from strongroom.events import routes as event_routes
from strongroom.idempotency import service as idempotency
from strongroom.ledger import routes as ledger_routes
from strongroom.payments import recovery, routes, routes_customers, routes_elements, routes_sandbox, routes_tokens
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
        remote = RemoteVault(settings.vault.url, secret, timeout_s=settings.payments.processor_timeout_s, verify=verify)
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


def create_app(settings: Settings, *, background: bool = True) -> FastAPI:
    public_url = settings.public_url

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(
            settings.effective_database_url,
            pool_size=settings.database.pool_size,
            pool_timeout_s=settings.database.pool_timeout_s,
            raw_pool_size=settings.database.raw_pool_size,
            read_gather_turns=settings.database.group_commit_gather_turns,
            flush_max_wait_s=settings.database.flush_max_wait_s,
        )
        app.state.services = build_services(settings, db, public_url)
        if isinstance(app.state.services.payments.vault, Vault):
            await app.state.services.payments.vault.keys.warm()
        tasks = []
        if background:
            ctx = app.state.services.payments
            idem = settings.idempotency
            tasks = [
                asyncio.create_task(
                    every(settings.payments.recovery_interval_s, "recovery", lambda: recovery.sweep(ctx))
                ),
                asyncio.create_task(
                    every(
                        3600,
                        "idempotency_purge",
                        lambda: idempotency.purge_expired(db, ttl_s=idem.ttl_s, batch=idem.purge_batch),
                    )
                ),
            ]
            if settings.vault.rotation_enabled and isinstance(ctx.vault, Vault):
                # PCI DSS 3.7.4 (SECURITY.md P6): the KEK is rotated when its crypto-period ends.
                vault_settings = settings.vault
                tasks.append(
                    asyncio.create_task(
                        every(
                            vault_settings.rotation_interval_s,
                            "key_rotation",
                            lambda: rotation.tick(ctx.vault, vault_settings),
                        )
                    )
                )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if app.state.services.relay is not None:
                await app.state.services.relay.aclose()
            if isinstance(app.state.services.payments.vault, RemoteVault):
                await app.state.services.payments.vault.aclose()
            app.state.services.payments.vault.close()
            await db.dispose()

    app = FastAPI(
        title="Strongroom",
        version=__version__,
        description="Stripe-compatible payments API",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url="/docs",
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
    return app


async def _sandbox_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    await SandboxHttp(scope["app"].state.services.sandbox)(scope, receive, send)


def _operational(app: FastAPI, settings: Settings, direct_routes: dict[tuple[str, str], APIRoute]) -> None:
    app.add_middleware(direct.Direct, routes=direct_routes)  # innermost: inside metrics and admission
    app.add_middleware(_Admission, max_inflight=settings.http.max_inflight)
    app.add_middleware(_Observe)

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

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
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
