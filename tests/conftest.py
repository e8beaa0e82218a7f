"""Fixtures: the suite runs on SQLite, and also on PostgreSQL when STRONGROOM_TEST_DATABASE_URL
is set (CI sets it). Each run creates its own PostgreSQL database and drops it afterwards; tests
isolate themselves by creating their own merchant, never by assuming an empty database."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from strongroom.api.http import Services
from strongroom.app import create_app
from strongroom.auth import service as auth_service
from strongroom.settings import Settings
from strongroom.store.migrate import upgrade

PG_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
DATABASES = ["sqlite", "postgres"] if PG_URL else ["sqlite"]


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(sa.text(statement))
    await engine.dispose()


def _fresh_postgres_database(admin_url: str) -> tuple[str, str]:
    name = "strongroom_test_" + secrets.token_hex(6)
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session", params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated, empty-at-start database for this session: SQLite file or a new PostgreSQL database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'strongroom.db'}"
        upgrade(url)
        yield url
        return
    assert PG_URL is not None
    name, url = _fresh_postgres_database(PG_URL)
    try:
        upgrade(url)
        yield url
    finally:
        asyncio.run(_admin(PG_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    # The race tests send up to 200 requests at once to one in-process app: they test the
    # database's concurrency, so admission control (tests/api/test_admission.py) stays out of it.
    overrides.setdefault("http", {"max_inflight": 1000})
    # The session's app serves every test from one client address: rate limits are tested with
    # apps of their own (tests/vault/test_card_form_abuse.py), and stay out of the others' way.
    overrides.setdefault("ratelimit", {"card_form_per_ip": 10**6, "threeds_per_ip": 10**6, "threeds_per_intent": 10**6})
    return Settings(data_dir=data_dir, database_url=database_url, **overrides)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def settings(database_url: str, data_dir: Path) -> Settings:
    return make_settings(database_url, data_dir)


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings, background=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(scope="session")
def services(app: FastAPI) -> Services:
    svc: Services = app.state.services
    return svc


@dataclass
class Merchant:
    id: str
    secret_key: str


async def new_merchant(services: Services, name: str = "Test merchant") -> Merchant:
    async with services.db.tx() as conn:
        created = await auth_service.create_merchant(conn, services.hasher, name)
    return Merchant(created.id, created.secret_key)


@pytest.fixture
async def merchant(services: Services) -> Merchant:
    return await new_merchant(services)


@pytest.fixture
async def api(app: FastAPI, merchant: Merchant) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client authenticated as a fresh merchant (form bodies, like the Stripe SDKs send)."""
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as client:
        yield client


@pytest.fixture
async def anonymous(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client
