"""SoftHSM2 and vault fixtures.

The HSM is real: SoftHSM2's PKCS#11 module with tokens initialised by `softhsm2-util` in a
temporary directory (SOFTHSM2_CONF points the library there). A PKCS#11 library only discovers
tokens when it is first loaded, so the session fixture creates a stock of empty tokens up front;
each test takes one of its own and empties it afterwards. Each test also gets a database of its
own (a fresh SQLite file, or a new PostgreSQL database when the session runs on PostgreSQL): key
versions are per database and per token, and tests here rotate and destroy them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
import pytest
from pkcs11.exceptions import UserAlreadyLoggedIn
from sqlalchemy.engine import make_url
from tests.conftest import PG_URL, _admin, _fresh_postgres_database

from strongroom.settings import Settings, VaultSettings
from strongroom.store.db import Database
from strongroom.store.migrate import upgrade
from strongroom.vault.keystore import open_keystore
from strongroom.vault.pkcs11 import LIBRARY_LOCK, Pkcs11Keystore
from strongroom.vault.service import CvcCache, Vault

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SO_PIN = "test-so-pin-0000"
USER_PIN = "test-user-pin-1234"
TOKEN_STOCK = 16


@dataclass
class SoftHsm:
    module: Path
    conf: Path
    free: list[str] = field(default_factory=list)

    def take_token(self) -> str:
        if not self.free:
            raise RuntimeError(f"all {TOKEN_STOCK} SoftHSM2 test tokens are in use: raise TOKEN_STOCK")
        return self.free.pop()


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM_MODULE.exists():
        pytest.fail("SoftHSM2 is required for the vault tests: apt-get install softhsm2 (.ci/run does)")
    root = tmp_path_factory.mktemp("softhsm")
    (root / "tokens").mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    # Read by the PKCS#11 library when it is first loaded, which happens after this fixture.
    os.environ["SOFTHSM2_CONF"] = str(conf)
    hsm = SoftHsm(SOFTHSM_MODULE, conf)
    for i in range(TOKEN_STOCK):
        label = f"strongroom-test-{i}"
        command = [util, "--init-token", "--free", "--label", label, "--so-pin", SO_PIN, "--pin", USER_PIN]
        subprocess.run(command, check=True, capture_output=True)
        hsm.free.append(label)
    return hsm


@pytest.fixture
def hsm_token(softhsm: SoftHsm) -> Iterator[str]:
    """An empty token of this test's own; emptied again and returned to the stock afterwards."""
    label = softhsm.take_token()
    yield label
    with LIBRARY_LOCK:
        token = pkcs11.lib(str(softhsm.module)).get_token(token_label=label)
        try:
            session = token.open(rw=True, user_pin=USER_PIN)
        except UserAlreadyLoggedIn:
            session = token.open(rw=True)
        try:
            for obj in list(session.get_objects()):
                obj.destroy()
        finally:
            session.close()
    softhsm.free.append(label)


@pytest.fixture
def fresh_database_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A new, migrated database on the session's backend."""
    if make_url(database_url).get_backend_name() == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'vault.db'}"
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


def hsm_settings(softhsm: SoftHsm, token: str, database_url: str, data_dir: Path, **vault: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        # The HSM is chosen by `hsm_module` in either mode; development mode spares the app
        # fixtures the other production secrets (API key hashing) that these tests do not need.
        hsm_module=softhsm.module,
        hsm_token_label=token,
        hsm_pin=USER_PIN,
        vault=VaultSettings(**vault),
    )


VaultFactory = Callable[..., AbstractAsyncContextManager[Vault]]


@pytest.fixture
def make_vault(softhsm: SoftHsm, hsm_token: str, fresh_database_url: str, tmp_path: Path) -> VaultFactory:
    """Opens a vault on this test's token and database; `**vault` overrides `VaultSettings`. Several
    vaults opened at once behave like several api processes sharing one HSM and one database."""

    @asynccontextmanager
    async def open_vault(**vault: Any) -> AsyncIterator[Vault]:
        settings = hsm_settings(softhsm, hsm_token, fresh_database_url, tmp_path, **vault)
        db = Database(settings.effective_database_url)
        opened = Vault(db, open_keystore(settings), CvcCache(60.0, 100), settings.vault)
        try:
            yield opened
        finally:
            opened.close()
            await db.dispose()

    return open_vault


def keystore_of(vault: Vault) -> Pkcs11Keystore:
    keystore = vault.keystore
    assert isinstance(keystore, Pkcs11Keystore), "these tests run against the PKCS#11 keystore"
    return keystore
