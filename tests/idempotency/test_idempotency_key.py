"""Idempotency-Key semantics (SECURITY.md I1 to I4), through the HTTP API of an in-process app.

Runs on SQLite and, with STRONGROOM_TEST_DATABASE_URL set, on PostgreSQL. Every test creates its
own merchant, so counts of intents, events and processor authorizations are the test's own.

Stripe's choices where the IETF draft (draft-ietf-httpapi-idempotency-key-header) differs:
- the same key with other parameters answers 400 `idempotency_error` (the draft suggests 422);
- a request refused before it started executing (bad parameters) stores nothing: the key stays
  free, and the same key may then carry a corrected request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pydantic
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from tests.conftest import Merchant, make_settings, new_merchant
from tests.factories import _form, card_payment_method

from strongroom.api import validate
from strongroom.api.http import Services, _HttpRecorder
from strongroom.app import create_app
from strongroom.auth import service as auth_service
from strongroom.auth.models import Principal
from strongroom.connectors.base import AuthorizeRequest, Connector, Declined
from strongroom.connectors.routing import Router
from strongroom.connectors.sandbox.tables import sandbox_operations
from strongroom.events.tables import events
from strongroom.idempotency import service as idempotency
from strongroom.idempotency.service import Claim, Replay
from strongroom.idempotency.tables import idempotency_keys
from strongroom.payments import authorize, intents, methods, recovery, routes
from strongroom.payments import params as p
from strongroom.payments.context import load
from strongroom.payments.models import IntentStatus
from strongroom.payments.tables import customers, payment_intents, payment_methods, refunds
from strongroom.settings import Settings

PAID = {"amount": "2000", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}


def new_key() -> str:
    return "idem_" + secrets.token_hex(12)


async def post(
    api: httpx.AsyncClient, path: str, data: dict[str, Any] | None = None, key: str | None = None
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(path, data=_form(data or {}), headers=headers)


@asynccontextmanager
async def client_for(app: FastAPI, secret_key: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


def principal_of(merchant: Merchant, livemode: bool = False) -> Principal:
    return Principal(merchant_id=merchant.id, livemode=livemode, key_id="test")


def scoped_key(services: Services, principal: Principal, key: str) -> idempotency.Key:
    """The key as the API stores it (its HMAC), for calls into the service."""
    return idempotency.scoped(services.hasher, principal.merchant_id, principal.livemode, key)


def stored_digest(services: Services, merchant_id: str, key: str) -> bytes:
    return idempotency.scoped(services.hasher, merchant_id, False, key).digest


async def key_row(services: Services, merchant_id: str, key: str) -> Any:
    query = sa.select(idempotency_keys).where(
        idempotency_keys.c.merchant_id == merchant_id,
        idempotency_keys.c.key_hash == stored_digest(services, merchant_id, key),
    )
    async with services.db.read() as conn:
        return (await conn.execute(query)).first()


async def backdate_key(services: Services, merchant_id: str, key: str, **ages_s: float) -> None:
    """Moves the key row's `created` and/or `locked_at` this many seconds into the past."""
    now = dt.datetime.now(dt.UTC)
    values = {column: now - dt.timedelta(seconds=age) for column, age in ages_s.items()}
    async with services.db.tx() as conn:
        updated = await conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.merchant_id == merchant_id,
                idempotency_keys.c.key_hash == stored_digest(services, merchant_id, key),
            )
            .values(**values)
        )
    assert updated.rowcount == 1


async def processor_operations(services: Services, merchant_id: str) -> int:
    query = sa.select(sa.func.count()).select_from(sandbox_operations)
    query = query.where(sandbox_operations.c.merchant_id == merchant_id)
    async with services.db.read() as conn:
        return int((await conn.execute(query)).scalar_one())


def assert_replay_of(replay: httpx.Response, original: httpx.Response) -> None:
    assert replay.status_code == original.status_code
    assert replay.content == original.content  # byte-identical
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in original.headers


class SimulatedCrash(Exception):
    """The process died right after the processor answered (nothing after it ran)."""


class _Wrapped:
    """A connector that delegates to the real sandbox connector."""

    def __init__(self, inner: Connector) -> None:
        self._inner = inner
        self.authorize_calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CrashAfterAuthorize(_Wrapped):
    async def authorize(self, request: AuthorizeRequest) -> Any:
        self.authorize_calls += 1
        await self._inner.authorize(request)
        raise SimulatedCrash


class CountingConnector(_Wrapped):
    async def authorize(self, request: AuthorizeRequest) -> Any:
        self.authorize_calls += 1
        return await self._inner.authorize(request)


# ---------------------------------------------------------------------------------------------
# I1: missing key where required, mismatched parameters, other path, concurrent use
# ---------------------------------------------------------------------------------------------


async def test_i1_missing_key_where_required_rejected_with_400(database_url: str, data_dir: Any) -> None:
    """Draft §2.7: a server that requires the header answers 400 when it is missing, and does nothing."""
    settings = make_settings(database_url, data_dir, idempotency={"require_key": True})
    application = create_app(settings, background=False)
    async with application.router.lifespan_context(application):
        svc: Services = application.state.services
        merchant = await new_merchant(svc)
        async with client_for(application, merchant.secret_key) as api:
            missing = await post(api, "/v1/customers", {"email": "jenny@example.com"})
            assert missing.status_code == 400, missing.text
            error = missing.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["code"] == "idempotency_key_missing"
            missing_pay = await post(api, "/v1/payment_intents", PAID)
            assert missing_pay.status_code == 400
            assert missing_pay.json()["error"]["code"] == "idempotency_key_missing"
            async with svc.db.read() as conn:
                for table in (customers, payment_intents):
                    count = sa.select(sa.func.count()).select_from(table).where(table.c.merchant_id == merchant.id)
                    assert (await conn.execute(count)).scalar_one() == 0
            assert await svc.sandbox.count_authorizations(merchant.id) == 0
            # Reads need no key; a POST with one goes through.
            assert (await api.get("/v1/customers")).status_code == 200
            ok = await post(api, "/v1/customers", {"email": "jenny@example.com"}, key=new_key())
            assert ok.status_code == 200, ok.text


async def test_i1_key_optional_by_default(api: httpx.AsyncClient, services: Services) -> None:
    assert services.settings.idempotency.require_key is False
    response = await post(api, "/v1/customers", {"email": "nokey@example.com"})
    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response.headers


async def test_i1_mismatched_parameters_rejected_with_idempotency_error(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """The same key with other parameters: 400 `idempotency_error` (Stripe's status; the IETF draft
    suggests 422 — we follow Stripe, as SECURITY.md I1 records), and nothing happens."""
    key = new_key()
    first = await post(api, "/v1/payment_intents", PAID, key=key)
    assert first.status_code == 200, first.text
    events_before = await count_rows(events, merchant.id)

    for changed in (
        {**PAID, "amount": "3000"},
        {**PAID, "description": "other"},
        {"amount": "2000", "currency": "usd"},
    ):
        response = await post(api, "/v1/payment_intents", changed, key=key)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "idempotency_error"
        assert error["code"] == "idempotency_key_in_use"
        assert key in error["message"]
        assert response.headers["Stripe-Should-Retry"] == "false"
        assert "Idempotent-Replayed" not in response.headers

    assert await count_rows(payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    assert await count_rows(events, merchant.id) == events_before
    # The key still answers its own request.
    assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), first)


async def test_i1_same_key_on_different_path_rejected_with_idempotency_error(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    key = new_key()
    created = await post(api, "/v1/customers", {"description": "x"}, key=key)
    assert created.status_code == 200
    other_path = await post(api, "/v1/payment_intents", PAID, key=key)
    assert other_path.status_code == 400, other_path.text
    assert other_path.json()["error"]["type"] == "idempotency_error"
    # Same parameters, other endpoint: still a different request.
    customer_id = created.json()["id"]
    same_params = await post(api, f"/v1/customers/{customer_id}", {"description": "x"}, key=key)
    assert same_params.status_code == 400
    assert same_params.json()["error"]["type"] == "idempotency_error"
    assert await count_rows(payment_intents, merchant.id) == 0
    assert await services.sandbox.count_authorizations(merchant.id) == 0


async def test_i1_concurrent_request_in_flight_gets_409_with_retry_after(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """While another request holds the key, a second one gets 409 and does nothing."""
    key = new_key()
    data = {"email": "inflight@example.com", "name": "In Flight"}
    settings = services.settings.idempotency
    held = await idempotency.claim(
        services.db,
        principal_of(merchant),
        scoped_key(services, principal_of(merchant), key),
        "POST",
        "/v1/customers",
        _form(data),
        lock_timeout_s=settings.lock_timeout_s,
        ttl_s=settings.ttl_s,
    )
    assert isinstance(held, Claim)
    assert held.recovered is False

    for _ in range(3):
        response = await post(api, "/v1/customers", data, key=key)
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["type"] == "idempotency_error"
        assert error["code"] == "idempotency_key_in_use"
        assert int(response.headers["Retry-After"]) >= 1
    assert await count_rows(customers, merchant.id) == 0

    # Different parameters while in flight are still a mismatch (400), not a conflict.
    mismatch = await post(api, "/v1/customers", {"email": "other@example.com"}, key=key)
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["type"] == "idempotency_error"

    # The holder gives the key up without having changed anything: the retry now runs, once.
    await held.release(services.db)
    ran = await post(api, "/v1/customers", data, key=key)
    assert ran.status_code == 200, ran.text
    assert_replay_of(await post(api, "/v1/customers", data, key=key), ran)
    assert await count_rows(customers, merchant.id) == 1


async def test_i1_in_flight_holder_response_is_what_retries_replay(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    key = new_key()
    data = {"email": "holder@example.com"}
    settings = services.settings.idempotency
    held = await idempotency.claim(
        services.db,
        principal_of(merchant),
        scoped_key(services, principal_of(merchant), key),
        "POST",
        "/v1/customers",
        _form(data),
        lock_timeout_s=settings.lock_timeout_s,
        ttl_s=settings.ttl_s,
    )
    assert isinstance(held, Claim)
    assert (await post(api, "/v1/customers", data, key=key)).status_code == 409
    async with services.db.tx() as conn:
        await held.store(conn, 200, b'{"stored":"by the holder"}')
    replay = await post(api, "/v1/customers", data, key=key)
    assert replay.status_code == 200
    assert replay.content == b'{"stored":"by the holder"}'
    assert replay.headers["Idempotent-Replayed"] == "true"


# ---------------------------------------------------------------------------------------------
# I2: scoping, expiry, purge, key length
# ---------------------------------------------------------------------------------------------


async def test_i2_keys_scoped_per_merchant(app: FastAPI, services: Services) -> None:
    """Draft §2: a key belongs to the client that sent it; another merchant's use of the same
    string is an unrelated request with its own result."""
    a, b = await new_merchant(services, "A"), await new_merchant(services, "B")
    key = new_key()
    async with client_for(app, a.secret_key) as api_a, client_for(app, b.secret_key) as api_b:
        first_a = await post(api_a, "/v1/payment_intents", PAID, key=key)
        first_b = await post(api_b, "/v1/payment_intents", PAID, key=key)
        assert first_a.status_code == first_b.status_code == 200
        assert "Idempotent-Replayed" not in first_b.headers
        assert first_a.json()["id"] != first_b.json()["id"]
        # B may even use A's key with other parameters: no idempotency_error across merchants.
        c = new_key()
        assert (await post(api_a, "/v1/customers", {"name": "A's"}, key=c)).status_code == 200
        b_other = await post(api_b, "/v1/customers", {"name": "B's, different"}, key=c)
        assert b_other.status_code == 200
        assert b_other.json()["name"] == "B's, different"
        # Each merchant's retry replays its own response, never the other's.
        assert_replay_of(await post(api_a, "/v1/payment_intents", PAID, key=key), first_a)
        assert_replay_of(await post(api_b, "/v1/payment_intents", PAID, key=key), first_b)
        # B cannot see A's intent either.
        assert (await api_b.get(f"/v1/payment_intents/{first_a.json()['id']}")).status_code == 404
    assert await services.sandbox.count_authorizations(a.id) == 1
    assert await services.sandbox.count_authorizations(b.id) == 1


async def test_i2_test_and_live_mode_keys_scoped_separately(
    app: FastAPI, services: Services, merchant: Merchant, api: httpx.AsyncClient
) -> None:
    async with services.db.tx() as conn:
        live_key = (await auth_service.create_api_key(conn, services.hasher, merchant.id, livemode=True)).reveal()
    key = new_key()
    in_test = await post(api, "/v1/customers", {"name": "Same"}, key=key)
    async with client_for(app, live_key) as live:
        in_live = await post(live, "/v1/customers", {"name": "Same"}, key=key)
        assert in_live.status_code == 200, in_live.text
        assert "Idempotent-Replayed" not in in_live.headers
        assert in_live.json()["livemode"] is True
        assert in_live.json()["id"] != in_test.json()["id"]
        # Other parameters under the same key in the other mode: a new request, not a mismatch.
        other = new_key()
        assert (await post(api, "/v1/customers", {"name": "test"}, key=other)).status_code == 200
        assert (await post(live, "/v1/customers", {"name": "live"}, key=other)).status_code == 200
        assert_replay_of(await post(live, "/v1/customers", {"name": "Same"}, key=key), in_live)
    assert in_test.json()["livemode"] is False
    assert_replay_of(await post(api, "/v1/customers", {"name": "Same"}, key=key), in_test)


async def test_i2_expiry_at_least_24_hours(services: Services) -> None:
    """Draft §2: the expiry is documented (settings.IdempotencySettings.ttl_s) and never below 24 h."""
    assert services.settings.idempotency.ttl_s >= 24 * 3600
    with pytest.raises(pydantic.ValidationError):
        Settings(idempotency={"ttl_s": 24 * 3600 - 1})


async def test_i2_expired_key_treated_as_new(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    ttl_s = services.settings.idempotency.ttl_s
    key = new_key()
    first = await post(api, "/v1/payment_intents", PAID, key=key)
    assert first.status_code == 200

    # Just inside the TTL: still a replay.
    await backdate_key(services, merchant.id, key, created=ttl_s - 60)
    assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), first)

    # Past the TTL: the key is new again — the same request runs again (a second payment).
    await backdate_key(services, merchant.id, key, created=ttl_s + 60)
    again = await post(api, "/v1/payment_intents", PAID, key=key)
    assert again.status_code == 200
    assert "Idempotent-Replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert await services.sandbox.count_authorizations(merchant.id) == 2
    assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), again)

    # Past the TTL, other parameters are no mismatch either: the old request is forgotten.
    await backdate_key(services, merchant.id, key, created=ttl_s + 60)
    other = await post(api, "/v1/customers", {"name": "after expiry"}, key=key)
    assert other.status_code == 200, other.text
    assert other.json()["object"] == "customer"
    assert await count_rows(payment_intents, merchant.id) == 2


async def test_i2_purge_expired_removes_old_rows_in_bounded_batches(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    ttl_s = services.settings.idempotency.ttl_s
    old = [new_key() for _ in range(5)]
    fresh = new_key()
    for key in [*old, fresh]:
        assert (await post(api, "/v1/customers", {"name": key}, key=key)).status_code == 200
    for key in old:
        await backdate_key(services, merchant.id, key, created=ttl_s + 3600)
    # One expired key whose request died holding it (never answered, lock never released).
    dead = new_key()
    data = {"name": "died"}
    claimed = await idempotency.claim(
        services.db,
        principal_of(merchant),
        scoped_key(services, principal_of(merchant), dead),
        "POST",
        "/v1/customers",
        data,
        lock_timeout_s=services.settings.idempotency.lock_timeout_s,
        ttl_s=ttl_s,
    )
    assert isinstance(claimed, Claim)
    await backdate_key(services, merchant.id, dead, created=ttl_s + 3600, locked_at=ttl_s + 3600)
    # An old key whose lock is fresh: a request holds it right now; purging must leave it alone.
    held = new_key()
    claimed = await idempotency.claim(
        services.db,
        principal_of(merchant),
        scoped_key(services, principal_of(merchant), held),
        "POST",
        "/v1/customers",
        {"name": "held"},
        lock_timeout_s=services.settings.idempotency.lock_timeout_s,
        ttl_s=ttl_s,
    )
    assert isinstance(claimed, Claim)
    await backdate_key(services, merchant.id, held, created=ttl_s + 3600)

    batch = 2
    rounds = []
    for _ in range(100):  # bounded: the whole table cannot need more
        purged = await idempotency.purge_expired(services.db, ttl_s=ttl_s, batch=batch)
        assert 0 <= purged <= batch
        rounds.append(purged)
        if purged == 0:
            break
    assert rounds[0] == batch  # at least 6 expired rows exist: the first call does a full batch
    assert rounds[-1] == 0
    assert sum(rounds) >= len(old) + 1
    for key in [*old, dead]:
        assert await key_row(services, merchant.id, key) is None
    assert await key_row(services, merchant.id, fresh) is not None
    assert (await key_row(services, merchant.id, held)).locked_at is not None
    # The fresh key still replays.
    replay = await post(api, "/v1/customers", {"name": fresh}, key=fresh)
    assert replay.headers["Idempotent-Replayed"] == "true"


@pytest.mark.parametrize("length", [256, 1000])
async def test_i2_key_longer_than_255_chars_rejected(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any, length: int
) -> None:
    response = await post(api, "/v1/payment_intents", PAID, key="k" * length)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "idempotency_key_invalid"
    assert await count_rows(payment_intents, merchant.id) == 0
    assert await count_rows(idempotency_keys, merchant.id) == 0
    assert await services.sandbox.count_authorizations(merchant.id) == 0


async def test_i2_key_of_exactly_255_chars_accepted(api: httpx.AsyncClient) -> None:
    key = "k" * 254 + secrets.choice("abcdefgh")
    first = await post(api, "/v1/customers", {"name": "long key"}, key=key)
    assert first.status_code == 200, first.text
    assert_replay_of(await post(api, "/v1/customers", {"name": "long key"}, key=key), first)


@pytest.mark.parametrize("key", ["", "tab\there", "naïve"])
async def test_i2_key_not_printable_ascii_rejected(api: httpx.AsyncClient, key: str) -> None:
    headers = {"Idempotency-Key": key.encode("utf-8")}
    response = await api.post("/v1/customers", data={"name": "x"}, headers=headers)  # type: ignore[dict-item]
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "idempotency_key_invalid"


# ---------------------------------------------------------------------------------------------
# I3: recovery points, stale locks, crash mid-payment, what is and is not stored
# ---------------------------------------------------------------------------------------------


async def test_i3_stale_lock_taken_over_by_retry_completes_with_one_authorization(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """A request dies after the processor authorized and before it recorded the outcome. Its
    retry is refused while the lock is fresh, takes the lock over once it is older than
    `lock_timeout_s`, resumes the recorded intent with the same processor key: one charge."""
    key = new_key()
    settings = services.settings.idempotency
    principal = principal_of(merchant)
    claimed = await idempotency.claim(
        services.db, principal, scoped_key(services, principal, key), "POST", "/v1/payment_intents", PAID,
        lock_timeout_s=settings.lock_timeout_s, ttl_s=settings.ttl_s,
    )  # fmt: skip
    assert isinstance(claimed, Claim)
    crashing = CrashAfterAuthorize(services.payments.router.for_mode(False))
    dying_ctx = dataclasses.replace(services.payments, router=Router(sandbox=crashing))  # type: ignore[arg-type]
    render = routes.one("payment_intent", routes._intent_view, [])
    with pytest.raises(SimulatedCrash):
        await intents.create(
            dying_ctx,
            principal,
            validate.parse(p.IntentCreate, PAID),
            _HttpRecorder(claimed, principal, render, services.db),
        )
    assert crashing.authorize_calls == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    row = await key_row(services, merchant.id, key)
    assert row.resource_id is not None  # the recovery point: the intent the dead request created
    assert row.locked_at is not None
    assert row.response_status is None
    async with services.db.read() as conn:
        stuck = await load(conn, payment_intents, principal, row.resource_id, "payment_intent")
    assert stuck["status"] == IntentStatus.PROCESSING

    # The lock is fresh: the dead request might still be running.
    busy = await post(api, "/v1/payment_intents", PAID, key=key)
    assert busy.status_code == 409
    assert busy.json()["error"]["type"] == "idempotency_error"

    await backdate_key(services, merchant.id, key, locked_at=settings.lock_timeout_s + 1)
    retried = await post(api, "/v1/payment_intents", PAID, key=key)
    assert retried.status_code == 200, retried.text
    body = retried.json()
    assert body["id"] == row.resource_id
    assert body["status"] == "succeeded"
    assert body["amount_received"] == 2000
    assert await count_rows(payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), retried)
    got = (await api.get(f"/v1/payment_intents/{body['id']}")).json()
    assert got["status"] == "succeeded"


async def test_i3_stale_lock_with_short_lock_timeout_recovered_without_backdating(
    database_url: str, data_dir: Any
) -> None:
    """With `lock_timeout_s` small, simply waiting it out lets the retry take over."""

    lock_timeout_s = 0.3
    settings = make_settings(database_url, data_dir, idempotency={"lock_timeout_s": lock_timeout_s})
    application = create_app(settings, background=False)
    async with application.router.lifespan_context(application):
        svc: Services = application.state.services
        merchant = await new_merchant(svc)
        principal = principal_of(merchant)
        key = new_key()
        claimed = await idempotency.claim(
            svc.db,
            principal,
            scoped_key(svc, principal, key),
            "POST",
            "/v1/payment_intents",
            PAID,
            lock_timeout_s=lock_timeout_s,
            ttl_s=86400,
        )
        assert isinstance(claimed, Claim)
        crashing = CrashAfterAuthorize(svc.payments.router.for_mode(False))
        dying_ctx = dataclasses.replace(svc.payments, router=Router(sandbox=crashing))  # type: ignore[arg-type]
        render = routes.one("payment_intent", routes._intent_view, [])
        with pytest.raises(SimulatedCrash):
            await intents.create(
                dying_ctx,
                principal,
                validate.parse(p.IntentCreate, PAID),
                _HttpRecorder(claimed, principal, render, svc.db),
            )
        async with client_for(application, merchant.secret_key) as api:
            await asyncio.sleep(lock_timeout_s + 0.2)
            retried = await post(api, "/v1/payment_intents", PAID, key=key)
            assert retried.status_code == 200, retried.text
            assert retried.json()["status"] == "succeeded"
            assert "Idempotent-Replayed" not in retried.headers
            assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), retried)
        assert await svc.sandbox.count_authorizations(merchant.id) == 1


async def test_i3_crash_after_processor_call_resumes_recovery_point_with_one_authorization(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """Brandur's atomic phases, step by step: the request claims its key, `authorize.begin`
    moves the intent to `processing` and records the recovery point in the same transaction,
    the processor authorizes under `<intent>:auth:<attempt>`, then the process dies. The retry
    (after the lock is stale) resumes the same attempt: the processor answers from its record."""
    created = await post(
        api, "/v1/payment_intents", {"amount": "1500", "currency": "eur", "payment_method": "pm_card_visa"}
    )
    intent_id = created.json()["id"]
    assert created.json()["status"] == "requires_confirmation"
    path = f"/v1/payment_intents/{intent_id}/confirm"
    key = new_key()
    principal = principal_of(merchant)
    settings = services.settings.idempotency
    ctx = services.payments

    claimed = await idempotency.claim(
        services.db, principal, scoped_key(services, principal, key), "POST", path, {},
        lock_timeout_s=settings.lock_timeout_s, ttl_s=settings.ttl_s,
    )  # fmt: skip
    assert isinstance(claimed, Claim)

    async with services.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
        attempt = await authorize.begin(conn, principal, intent, pm, claimed)  # type: ignore[arg-type]
    assert attempt.key == f"{intent_id}:auth:1"
    assert (await key_row(services, merchant.id, key)).resource_id == intent_id
    assert (await api.get(f"/v1/payment_intents/{intent_id}")).json()["status"] == "processing"

    # What the dead request sent, exactly as `authorize.drive` builds it.
    async with services.db.read() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent")
        pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
    request = AuthorizeRequest(
        idempotency_key=attempt.key,
        merchant_id=merchant.id,
        amount_minor=intent["amount"],
        currency=intent["currency"],
        capture=True,
        card=methods.card_ref(pm),
        livemode=False,
    )
    authorization = await ctx.router.for_mode(False).authorize(request)
    assert await services.sandbox.count_authorizations(merchant.id) == 1

    assert (await post(api, path, {}, key=key)).status_code == 409  # lock still fresh
    await backdate_key(services, merchant.id, key, locked_at=settings.lock_timeout_s + 5)
    retried = await post(api, path, {}, key=key)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "succeeded"
    assert retried.json()["amount_received"] == 1500
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    async with services.db.read() as conn:
        done = await load(conn, payment_intents, principal, intent_id, "payment_intent")
    assert done["processor_ref"] == authorization.processor_ref  # the dead request's charge
    assert done["attempt"] == 1
    assert done["pending_op"] is None
    assert_replay_of(await post(api, path, {}, key=key), retried)
    charges_list = (await api.get("/v1/charges", params={"payment_intent": intent_id})).json()
    assert [c["status"] for c in charges_list["data"] if c["payment_intent"] == intent_id] == ["succeeded"]


@pytest.mark.parametrize("card", ["alias", "stored"])
async def test_i3_decline_stored_and_replayed_without_second_processor_call(
    api: httpx.AsyncClient,
    services: Services,
    merchant: Merchant,
    count_rows: Any,
    monkeypatch: pytest.MonkeyPatch,
    card: str,
) -> None:
    counting = CountingConnector(services.payments.router.for_mode(False))
    monkeypatch.setattr(services.payments.router, "for_mode", lambda livemode: counting)
    key = new_key()
    if card == "alias":
        data = {**PAID, "payment_method": "pm_card_chargeDeclined"}
    else:  # a stored card: its key is claimed by the decline's own commit (idempotency.deferred)
        data = {**PAID, "payment_method": (await card_payment_method(api, number="4000000000000002"))["id"]}
    declined = await post(api, "/v1/payment_intents", data, key=key)
    assert declined.status_code == 402, declined.text
    error = declined.json()["error"]
    assert error["type"] == "card_error"
    assert error["decline_code"] == "generic_decline"
    assert error["payment_intent"]["status"] == "requires_payment_method"
    assert counting.authorize_calls == 1
    assert (await key_row(services, merchant.id, key)).response_status == 402
    events_before = await count_rows(events, merchant.id)
    operations_before = await processor_operations(services, merchant.id)

    for _ in range(2):
        assert_replay_of(await post(api, "/v1/payment_intents", data, key=key), declined)
    assert counting.authorize_calls == 1
    assert await processor_operations(services, merchant.id) == operations_before == 1
    assert await count_rows(events, merchant.id) == events_before
    assert await count_rows(payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 0


async def test_i3_validation_error_not_stored_same_request_fails_again(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """Parameters that fail validation are refused before the key is claimed: nothing is stored,
    the same bad request fails again (no replay), and the key can then carry a valid request.
    The same holds for requests a service refuses before changing anything (the key is released)."""
    key = new_key()
    bad = {**PAID, "bogus": "1"}
    for _ in range(2):
        response = await post(api, "/v1/payment_intents", bad, key=key)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "bogus"
        assert "Idempotent-Replayed" not in response.headers
        assert await key_row(services, merchant.id, key) is None

    # Refused inside the service (after the claim): confirm without a payment method.
    refused = {"amount": "2000", "currency": "usd", "confirm": "true"}
    for _ in range(2):
        response = await post(api, "/v1/payment_intents", refused, key=key)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "payment_intent_unexpected_state"
        assert "Idempotent-Replayed" not in response.headers
        assert await key_row(services, merchant.id, key) is None

    # An amount the currency cannot hold: refused by the service, key released.
    response = await post(api, "/v1/payment_intents", {**PAID, "amount": "-5"}, key=key)
    assert response.status_code == 400
    assert await key_row(services, merchant.id, key) is None
    assert await count_rows(payment_intents, merchant.id) == 0

    good = await post(api, "/v1/payment_intents", PAID, key=key)
    assert good.status_code == 200, good.text
    assert good.json()["status"] == "succeeded"
    assert_replay_of(await post(api, "/v1/payment_intents", PAID, key=key), good)
    assert await services.sandbox.count_authorizations(merchant.id) == 1


# ---------------------------------------------------------------------------------------------
# I1 to I4 for a deferred claim: a payment with a stored card writes its key with its first commit
# ---------------------------------------------------------------------------------------------


async def stored_card_payment(api: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    """A create+confirm with a payment method stored before (not a test alias): the request whose
    key is claimed in the payment's own first commit (idempotency.deferred)."""
    pm = await card_payment_method(api)
    return {**PAID, "payment_method": pm["id"], **extra}


async def hold_key(services: Services, merchant: Merchant, key: str, data: dict[str, Any]) -> Claim:
    """The key claimed by another request still running (its lock fresh)."""
    settings = services.settings.idempotency
    held = await idempotency.claim(
        services.db, principal_of(merchant), scoped_key(services, principal_of(merchant), key),
        "POST", "/v1/payment_intents", data,
        lock_timeout_s=settings.lock_timeout_s, ttl_s=settings.ttl_s,
    )  # fmt: skip
    assert isinstance(held, Claim)
    return held


@pytest.mark.parametrize(
    ("extra", "resource"),
    [({}, True), ({"expand[]": "latest_charge"}, True), ({"confirm": "false"}, False)],
    ids=["confirmed", "expanded", "not-confirmed"],
)
async def test_i1_deferred_claim_key_row_holds_the_recovery_point_and_the_response(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, extra: dict[str, Any], resource: bool
) -> None:
    """Each way a create can record its key without a claim of its own (the checkpoint, the stored
    response rendered offline, the response rendered in the final transaction) leaves the same
    row a claimed key does: the intent as recovery point, the exact response bytes, unlocked."""
    key = new_key()
    data = await stored_card_payment(api, **extra)
    first = await post(api, "/v1/payment_intents", data, key=key)
    assert first.status_code == 200, first.text
    row = await key_row(services, merchant.id, key)
    assert row.response_status == 200
    assert bytes(row.response_body) == first.content
    assert row.locked_at is None
    assert row.resource_id == (first.json()["id"] if resource else None)
    assert_replay_of(await post(api, "/v1/payment_intents", data, key=key), first)
    assert await services.sandbox.count_authorizations(merchant.id) == (1 if resource else 0)


async def test_i1_deferred_claim_in_flight_key_gets_409_and_writes_nothing(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """A key held by another request: the payment's first commit (which carries the key's INSERT)
    fails as a whole, so no intent, event or authorization is left, and the answer is the 409 a
    claimed key gets; other parameters are still a mismatch."""
    key = new_key()
    data = await stored_card_payment(api)
    held = await hold_key(services, merchant, key, data)
    events_before = await count_rows(events, merchant.id)
    for _ in range(2):
        conflict = await post(api, "/v1/payment_intents", data, key=key)
        assert conflict.status_code == 409, conflict.text
        assert conflict.json()["error"]["code"] == "idempotency_key_in_use"
    mismatch = await post(api, "/v1/payment_intents", {**data, "amount": "2001"}, key=key)
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["type"] == "idempotency_error"
    assert await count_rows(payment_intents, merchant.id) == 0
    assert await count_rows(events, merchant.id) == events_before
    assert await services.sandbox.count_authorizations(merchant.id) == 0

    await held.release(services.db)
    ran = await post(api, "/v1/payment_intents", data, key=key)
    assert ran.status_code == 200, ran.text
    assert_replay_of(await post(api, "/v1/payment_intents", data, key=key), ran)
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_i4_deferred_claim_replays_the_stored_response_when_the_request_would_now_be_refused(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """The customer of a completed payment is deleted; a retry of the payment under its key must
    still get the stored response (a replay), not the 404 the request would get if run again:
    a deferred claim's refusal is answered only after the key was looked at."""
    customer = (await post(api, "/v1/customers", {"email": "gone@example.com"})).json()
    data = await stored_card_payment(api, customer=customer["id"])
    key = new_key()
    first = await post(api, "/v1/payment_intents", data, key=key)
    assert first.status_code == 200, first.text
    assert (await api.delete(f"/v1/customers/{customer['id']}")).status_code == 200
    fresh = await post(api, "/v1/payment_intents", data, key=new_key())
    assert fresh.status_code == 404  # what running it again would answer
    assert_replay_of(await post(api, "/v1/payment_intents", data, key=key), first)
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_i3_deferred_claim_stale_lock_is_taken_over_and_resumed_with_one_authorization(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    """A request that died holding the key (before any write of its own) left it locked; the
    retry's own first commit fails on the key, and the retry then takes the stale lock over and
    runs: one intent, one authorization."""
    key = new_key()
    data = await stored_card_payment(api)
    await hold_key(services, merchant, key, data)
    lock_timeout_s = services.settings.idempotency.lock_timeout_s
    await backdate_key(services, merchant.id, key, locked_at=lock_timeout_s + 60)
    retried = await post(api, "/v1/payment_intents", data, key=key)
    assert retried.status_code == 200, retried.text
    assert retried.json()["status"] == "succeeded"
    assert await count_rows(payment_intents, merchant.id) == 1
    assert await services.sandbox.count_authorizations(merchant.id) == 1
    assert_replay_of(await post(api, "/v1/payment_intents", data, key=key), retried)


# ---------------------------------------------------------------------------------------------
# I4: replays are identical
# ---------------------------------------------------------------------------------------------


async def test_i4_replay_returns_identical_status_and_body(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    key = new_key()
    data = {**PAID, "metadata": {"order": "42"}, "expand[]": "latest_charge"}
    first = await post(api, "/v1/payment_intents", data, key=key)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "succeeded"
    assert first.json()["latest_charge"]["object"] == "charge"
    counts = (await count_rows(events, merchant.id), await count_rows(payment_intents, merchant.id))
    for _ in range(3):
        replay = await post(api, "/v1/payment_intents", data, key=key)
        assert_replay_of(replay, first)
        assert replay.headers["Idempotency-Key"] == key
        assert replay.headers["content-type"] == "application/json"
    assert (await count_rows(events, merchant.id), await count_rows(payment_intents, merchant.id)) == counts
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_i4_capture_replay_identical(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    intent = (await post(api, "/v1/payment_intents", {**PAID, "capture_method": "manual"})).json()
    assert intent["status"] == "requires_capture"
    key = new_key()
    path = f"/v1/payment_intents/{intent['id']}/capture"
    first = await post(api, path, {"amount_to_capture": "1500"}, key=key)
    assert first.status_code == 200, first.text
    assert first.json()["amount_received"] == 1500
    events_before = await count_rows(events, merchant.id)
    assert_replay_of(await post(api, path, {"amount_to_capture": "1500"}, key=key), first)
    assert await count_rows(events, merchant.id) == events_before
    # A capture under a new key is a new request, refused by the state machine.
    again = await post(api, path, {"amount_to_capture": "1500"}, key=new_key())
    assert again.status_code == 400
    assert again.json()["error"]["code"] == "payment_intent_unexpected_state"
    assert await services.sandbox.count_captured_authorizations(merchant.id) == 1


async def test_i4_refund_replay_identical(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, count_rows: Any
) -> None:
    intent = (await post(api, "/v1/payment_intents", PAID)).json()
    key = new_key()
    data = {"payment_intent": intent["id"], "amount": "500", "reason": "requested_by_customer"}
    first = await post(api, "/v1/refunds", data, key=key)
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "succeeded"
    events_before = await count_rows(events, merchant.id)
    for _ in range(2):
        assert_replay_of(await post(api, "/v1/refunds", data, key=key), first)
    assert await count_rows(refunds, merchant.id) == 1
    assert await count_rows(events, merchant.id) == events_before
    charge = (await api.get(f"/v1/charges/{intent['latest_charge']}")).json()
    assert charge["amount_refunded"] == 500


async def test_i4_customer_create_replay_identical(api: httpx.AsyncClient, merchant: Merchant, count_rows: Any) -> None:
    key = new_key()
    data = {"email": "replay@example.com", "name": "Re Play", "metadata": {"a": "b"}}
    first = await post(api, "/v1/customers", data, key=key)
    assert first.status_code == 200, first.text
    events_before = await count_rows(events, merchant.id)
    assert_replay_of(await post(api, "/v1/customers", data, key=key), first)
    assert await count_rows(customers, merchant.id) == 1
    assert await count_rows(events, merchant.id) == events_before


async def test_i4_replay_after_object_changed_returns_original_body(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    key = new_key()
    data = {**PAID, "expand[]": "latest_charge"}
    first = await post(api, "/v1/payment_intents", data, key=key)
    assert first.json()["latest_charge"]["amount_refunded"] == 0
    intent_id = first.json()["id"]
    refund = await post(api, "/v1/refunds", {"payment_intent": intent_id}, key=new_key())
    assert refund.status_code == 200, refund.text
    now = (await api.get(f"/v1/payment_intents/{intent_id}", params={"expand[]": "latest_charge"})).json()
    assert now["latest_charge"]["amount_refunded"] == 2000
    assert now["latest_charge"]["refunded"] is True

    replay = await post(api, "/v1/payment_intents", data, key=key)
    assert_replay_of(replay, first)
    assert replay.json()["latest_charge"]["amount_refunded"] == 0

    ckey = new_key()
    created = await post(api, "/v1/customers", {"description": "before"}, key=ckey)
    customer_id = created.json()["id"]
    changed = await post(api, f"/v1/customers/{customer_id}", {"description": "after"}, key=new_key())
    assert changed.json()["description"] == "after"
    assert_replay_of(await post(api, "/v1/customers", {"description": "before"}, key=ckey), created)
    assert await services.sandbox.count_authorizations(merchant.id) == 1


async def test_i4_replay_is_not_a_new_claim(services: Services, merchant: Merchant, api: httpx.AsyncClient) -> None:
    """The service answers a completed key with the stored `Replay`, never with a new claim."""
    key = new_key()
    data = {"name": "direct"}
    first = await post(api, "/v1/customers", data, key=key)
    settings = services.settings.idempotency
    again = await idempotency.claim(
        services.db, principal_of(merchant), scoped_key(services, principal_of(merchant), key),
        "POST", "/v1/customers", _form(data),
        lock_timeout_s=settings.lock_timeout_s, ttl_s=settings.ttl_s,
    )  # fmt: skip
    assert again == Replay(status=200, body=first.content)


async def test_i3_decline_settled_by_the_sweep_is_what_the_retry_answers(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """The request dies after the processor declined; the recovery sweep settles the attempt
    before the client retries. The retry must answer the 402 decline the first response would
    have been (not a 200 with a requires_payment_method intent), and replay it after that."""
    created = await post(
        api, "/v1/payment_intents", {"amount": "1500", "currency": "eur", "payment_method": "pm_card_chargeDeclined"}
    )
    intent_id = created.json()["id"]
    path = f"/v1/payment_intents/{intent_id}/confirm"
    key = new_key()
    principal = principal_of(merchant)
    settings = services.settings.idempotency
    claimed = await idempotency.claim(
        services.db, principal, scoped_key(services, principal, key), "POST", path, {},
        lock_timeout_s=settings.lock_timeout_s, ttl_s=settings.ttl_s,
    )  # fmt: skip
    assert isinstance(claimed, Claim)
    async with services.db.tx() as conn:
        intent = await load(conn, payment_intents, principal, intent_id, "payment_intent", for_update=True)
        pm = await load(conn, payment_methods, principal, intent["payment_method_id"], "payment_method")
        attempt = await authorize.begin(conn, principal, intent, pm, claimed)  # type: ignore[arg-type]
    # What the dead request sent: the processor declines it and records the decline under the key.
    request = AuthorizeRequest(
        idempotency_key=attempt.key,
        merchant_id=merchant.id,
        amount_minor=1500,
        currency="eur",
        capture=True,
        card=methods.card_ref(pm),
        livemode=False,
    )
    with pytest.raises(Declined):
        await services.payments.router.for_mode(False).authorize(request)

    await recovery.sweep(services.payments, older_than_s=0)
    settled = (await api.get(f"/v1/payment_intents/{intent_id}")).json()
    assert settled["status"] == "requires_payment_method"

    await backdate_key(services, merchant.id, key, locked_at=settings.lock_timeout_s + 5)
    retried = await post(api, path, {}, key=key)
    assert retried.status_code == 402, retried.text
    assert retried.json()["error"]["code"] == "card_declined"
    assert retried.json()["error"]["decline_code"] == "generic_decline"
    assert retried.json()["error"]["payment_intent"]["id"] == intent_id
    assert_replay_of(await post(api, path, {}, key=key), retried)
    assert await services.sandbox.count_authorizations(merchant.id) == 0


@pytest.mark.parametrize("key", ["4242424242424242", "4000-0566-5566-5556", "3782 822463 10005"])
async def test_p2_a_card_number_as_idempotency_key_is_refused_and_never_stored(
    api: httpx.AsyncClient, services: Services, merchant: Merchant, key: str
) -> None:
    response = await post(api, "/v1/customers", {"name": "x"}, key=key)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "idempotency_key_invalid"
    assert key not in response.text and "Idempotency-Key" not in response.headers
    assert await key_row(services, merchant.id, key) is None


@pytest.mark.parametrize(
    "key", ["12345678-1234-4234-8234-123456789012", "order-4242424242424241-retry", "ab4111111111111111cd09"]
)
async def test_keys_that_merely_hold_digit_groups_are_accepted(api: httpx.AsyncClient, key: str) -> None:
    # UUIDs (the stripe SDK's keys) and hex digests hold digit runs that may look like a card by chance.
    response = await post(api, "/v1/customers", {"name": "x"}, key=key)
    assert response.status_code == 200, response.text


async def test_i2_key_at_rest_only_as_its_hmac_bound_to_the_merchant(
    api: httpx.AsyncClient, services: Services, merchant: Merchant
) -> None:
    """PCI DSS 3.5.1: a key such as `order-<card number>` was stored as sent. Now the row holds
    HMAC-SHA256 under the server's key-hash secret, over merchant, mode and key; replays still work."""
    key = "order-" + secrets.token_hex(8)
    first = await post(api, "/v1/customers", {"name": "x"}, key=key)
    row = await key_row(services, merchant.id, key)
    assert row is not None
    assert all(key.encode() not in (v if isinstance(v, bytes) else str(v).encode()) for v in row)
    assert len(row.key_hash) == 32
    assert row.key_hash != idempotency.scoped(services.hasher, "acct_other", False, key).digest
    assert row.key_hash != idempotency.scoped(services.hasher, merchant.id, True, key).digest
    assert_replay_of(await post(api, "/v1/customers", {"name": "x"}, key=key), first)
