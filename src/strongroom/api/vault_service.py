"""The vault as its own process (`strongroom vault serve`): the cardholder-data environment's
only network surface, for the api and nothing else.

Every `/internal/v1/...` request must carry a valid service signature (`strongroom.vault.channel`);
anything else is a 401 and touches nothing. The vault has its own database (`vault.database_url`,
with its own credentials; the api's database then holds no card data at all), its own keys (the
HSM), its own CVC cache, and the relay: card data leaves this process only towards the allowlisted
processors. Key rotation runs here, on its schedule.

    POST /internal/v1/cards              {merchant_id, number, cvc?}  → {token, fingerprint}
    POST /internal/v1/cards/discard_cvc  {merchant_id, token}         → 204
    POST /internal/v1/relay              {actor, merchant_id, token, exp_month, exp_year,
                                          call: {template, values, headers, base_url}}
                                         → {status_code, body, headers} (card data redacted)
                                         403 {error: {message, code, param}}: refused, audited
    GET  /healthz
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import orjson
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from strongroom.errors import ResourceMissing
from strongroom.sensitive import Secret
from strongroom.settings import Settings
from strongroom.store.db import Database
from strongroom.vault import rotation
from strongroom.vault.channel import HEADER, ChannelError, Verifier
from strongroom.vault.keystore import VaultIntegrityError, open_keystore
from strongroom.vault.relay import Allowlist, CardFacts, Relay, RelayCall, RelayFailed, RelayRefused
from strongroom.vault.remote import CARDS_PATH, DISCARD_CVC_PATH, RELAY_PATH
from strongroom.vault.service import CvcCache, Vault
from strongroom.vault.templates import SANDBOX_MOUNT, default_registry
from strongroom.worker.runner import Periodic, Worker

log = structlog.get_logger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


class _Vault:
    """What the lifespan builds: the vault, its relay, and the channel's verifier."""

    def __init__(self, settings: Settings) -> None:
        if settings.vault.service_secret is None:
            raise RuntimeError("strongroom vault serve needs STRONGROOM_VAULT__SERVICE_SECRET (>= 32 bytes)")
        self.settings = settings
        self.db = Database(settings.vault.database_url or settings.effective_database_url)
        self.vault = Vault(
            self.db,
            open_keystore(settings),
            CvcCache(settings.vault.cvc_ttl_s, settings.vault.cvc_cache_max),
            settings.vault,
        )
        self.relay = Relay(
            self.vault,
            self.db,
            Allowlist(settings.vault.relay_allowlist, local_test_origins=settings.vault.relay_local_test_origins),
            timeout_s=settings.payments.processor_timeout_s,
            # The sandbox's template may also go to the api's sandbox mount on a listed local origin.
            templates=default_registry(
                {"sandbox": [o.rstrip("/") + SANDBOX_MOUNT for o in settings.vault.relay_local_test_origins]}
            ),
            group_commit_max=settings.database.group_commit_max,
        )
        self.verifier = Verifier(Secret(settings.vault.service_secret.get_secret_value().encode()))

    async def close(self) -> None:
        await self.relay.aclose()
        self.vault.close()
        await self.db.dispose()


async def _authenticated(request: Request) -> tuple[_Vault, dict[str, Any]]:
    state: _Vault = request.app.state.vault
    body = await request.body()
    state.verifier.verify(request.headers.get(HEADER), request.method, request.url.path, body)
    data = orjson.loads(body)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return state, data


async def tokenize(request: Request) -> Response:
    state, data = await _authenticated(request)
    number = str(data["number"])
    if not (12 <= len(number) <= 19 and number.isdigit()):
        return _error(400, "The card number is not a valid card number.")
    cvc = data.get("cvc")
    async with state.db.tx() as conn:
        stored = await state.vault.tokenize(
            conn, str(data["merchant_id"]), Secret(number), Secret(str(cvc)) if cvc else None
        )
    return JSONResponse({"token": stored.token, "fingerprint": stored.fingerprint})


async def discard_cvc(request: Request) -> Response:
    state, data = await _authenticated(request)
    state.vault.discard_cvc(str(data["merchant_id"]), str(data["token"]))
    return Response(status_code=204)


_RELAY_KEYS = frozenset({"actor", "merchant_id", "token", "exp_month", "exp_year", "call"})


async def relay(request: Request) -> Response:
    state, data = await _authenticated(request)
    spec = data.get("call")
    call = RelayCall.from_wire(spec if isinstance(spec, dict) else {"call": spec})
    # Anything beyond the call (a raw request, say) is refused and audited by the relay.
    extra = tuple(str(k)[:40] for k in data if k not in _RELAY_KEYS)
    if extra:
        call = dataclasses.replace(call, unexpected=call.unexpected + extra)
    try:
        answer = await state.relay.send(
            actor=str(data["actor"])[:64],
            merchant_id=str(data["merchant_id"]),
            token=str(data["token"]),
            card=CardFacts(int(data["exp_month"]), int(data["exp_year"])),
            call=call,
        )
    except RelayRefused as exc:
        error = {"message": exc.message, "code": exc.code, "param": exc.param}
        return JSONResponse({"error": error}, status_code=403)
    except ResourceMissing as exc:
        return _error(404, exc.message)
    except RelayFailed as exc:
        return _error(504 if exc.timed_out else 502, str(exc))
    except VaultIntegrityError:
        return _error(502, "The stored card failed its integrity check.")
    return JSONResponse({"status_code": answer.status_code, "body": answer.body, "headers": dict(answer.headers)})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


def _guarded(endpoint: Any) -> Any:
    async def handle(request: Request) -> Response:
        try:
            response: Response = await endpoint(request)
        except ChannelError as exc:
            log.warning(
                "vault.channel_refused", reason=str(exc), client=request.client.host if request.client else None
            )
            return _error(401, "Not an authenticated request from the api.")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return _error(400, "Malformed internal request.")
        return response

    return handle


def create_vault_app(settings: Settings, *, background: bool = True) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = _Vault(settings)
        app.state.vault = state
        worker = None
        if background and settings.vault.rotation_enabled:
            # PCI DSS 3.7.4 (SECURITY.md P6): the vault process rotates its own keys on schedule,
            # one vault process of several at a time (the job's lease).
            vault_settings = settings.vault
            rotate = Periodic(
                "key_rotation", vault_settings.rotation_interval_s, lambda: rotation.tick(state.vault, vault_settings)
            )
            worker = Worker(state.db, settings.worker, periodic=[rotate])
            worker.start()
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            await state.close()

    routes = [
        Route(CARDS_PATH, _guarded(tokenize), methods=["POST"]),
        Route(DISCARD_CVC_PATH, _guarded(discard_cvc), methods=["POST"]),
        Route(RELAY_PATH, _guarded(relay), methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def vault_app_from_environment() -> Starlette:
    """The uvicorn factory used by `strongroom vault serve` (settings from STRONGROOM_* variables)."""
    from strongroom.cli import _configure_logging
    from strongroom.settings import load_settings

    settings = load_settings()
    _configure_logging(settings.log_level)
    return create_vault_app(settings)
