"""Production defaults (`STRONGROOM_DEVELOPMENT=false`, issue 17 item 9).

- PCI DSS 4.2.1 (SECURITY.md P8): `serve` and `vault serve` refuse to listen in plain HTTP unless
  told that TLS ends at a proxy in front (`--behind-tls-proxy` or `http.behind_tls_proxy`); the api
  refuses an `http://` vault URL (card numbers cross that channel).
- PCI DSS 8.6 (SECURITY.md P17): production creates no test merchant and prints no key by itself.
- PCI DSS 7.2.1 (SECURITY.md P11, least privilege): the SQLite database and its `-wal` and `-shm`
  files are readable by their owner only (0600), whatever the umask.

Development (the default, `make serve`) still creates a test merchant and prints its key once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from strongroom.app import create_app
from strongroom.sensitive import Secret
from strongroom.settings import Settings
from strongroom.store.db import Database
from strongroom.store.migrate import upgrade
from strongroom.vault.remote import RemoteVault
from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _wait_healthy

CLI_TIMEOUT_S = 60.0
REFUSAL = "outside development the server listens with TLS only"


def _production_env(**extra: str) -> dict[str, str]:
    return _environment(None) | {
        "STRONGROOM_DEVELOPMENT": "false",
        "STRONGROOM_AUTH__KEY_HASH_SECRET": secrets.token_urlsafe(32),
        "STRONGROOM_VAULT__ALLOW_DEVELOPMENT_KEYSTORE": "true",
        **extra,
    }


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The command run to its end; one that starts serving instead is cut off (and fails here)."""
    try:
        return subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"strongroom {' '.join(args)} served in plain HTTP instead of refusing: {exc.stdout!r}")


def _modes(data_dir: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data_dir.glob("strongroom.db*")}


@pytest.mark.e2e
def test_pci_4_2_1_serve_refuses_plain_http_in_production(tmp_path: Path):
    data_dir = tmp_path / "data"
    done = _run(["serve", "--port", str(_free_port()), "--data-dir", str(data_dir)], _production_env())
    assert done.returncode == 2, done.stdout + done.stderr
    assert REFUSAL in done.stderr
    assert "sk_test_" not in done.stdout + done.stderr
    assert not (data_dir / "strongroom.db").exists()  # refused before touching anything


@pytest.mark.e2e
def test_pci_4_2_1_vault_serve_refuses_plain_http_in_production(tmp_path: Path):
    env = _production_env(STRONGROOM_VAULT__SERVICE_SECRET=secrets.token_urlsafe(48))
    done = _run(["vault", "serve", "--port", str(_free_port()), "--data-dir", str(tmp_path / "vault")], env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert REFUSAL in done.stderr


def _serve(args: list[str], env: dict[str, str], log_path: Path, url: str) -> Iterator[None]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(_cli(*args), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, url, log_path)
        yield
    finally:
        _stop(proc)


@pytest.mark.e2e
def test_pci_8_6_production_behind_a_tls_proxy_creates_no_merchant_and_prints_no_key(tmp_path: Path):
    data_dir, log_path, port = tmp_path / "data", tmp_path / "server.log", _free_port()
    token = secrets.token_urlsafe(32)
    env = _production_env(STRONGROOM_HTTP__METRICS_TOKEN=token)
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--behind-tls-proxy"]
    for _ in _serve(args, env, log_path, url):
        assert httpx.get(f"{url}/metrics").status_code == 401
        assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{url}/docs").status_code == 404
        created = httpx.post(f"{url}/v1/customers", headers={"Authorization": "Bearer sk_test_guess"})
        assert created.status_code == 401
    log = log_path.read_text()
    assert "sk_test_" not in log.replace("sk_test_gues", "")  # only the failed guess's logged prefix
    assert "Created test merchant" not in log
    # PCI DSS 10.2.1 (P18) through the production log pipeline: the failure, its origin, no key.
    assert '"event": "auth.failed"' in log and '"ip": "127.0.0.1"' in log
    assert '"key_prefix": "sk_test_gues"' in log and "sk_test_guess" not in log
    with sqlite3.connect(data_dir / "strongroom.db") as db:
        assert db.execute("SELECT count(*) FROM merchants").fetchone() == (0,)
    modes = _modes(data_dir)
    assert {"strongroom.db", "strongroom.db-wal", "strongroom.db-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


@pytest.mark.e2e
def test_pci_4_2_1_vault_serve_listens_in_plain_http_when_the_setting_says_tls_ends_in_front(tmp_path: Path):
    port = _free_port()
    env = _production_env(
        STRONGROOM_VAULT__SERVICE_SECRET=secrets.token_urlsafe(48), STRONGROOM_HTTP__BEHIND_TLS_PROXY="true"
    )
    args = ["vault", "serve", "--port", str(port), "--data-dir", str(tmp_path / "vault")]
    for _ in _serve(args, env, tmp_path / "vault.log", f"http://127.0.0.1:{port}"):
        pass


@pytest.mark.e2e
def test_development_serve_still_creates_a_test_merchant_and_prints_its_key_once(tmp_path: Path):
    data_dir, log_path, port = tmp_path / "data", tmp_path / "server.log", _free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir)]
    for _ in _serve(args, _environment(None), log_path, f"http://127.0.0.1:{port}"):
        key = next(word for word in log_path.read_text().split() if word.startswith("sk_test_"))
        response = httpx.get(f"http://127.0.0.1:{port}/v1/customers", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert set(_modes(data_dir).values()) == {0o600}


def test_pci_4_2_1_remote_vault_refuses_plain_http_outside_development():
    secret = Secret(secrets.token_bytes(32))
    for url in ("http://vault.internal:8081", "vault.internal:8081", "ftp://vault.internal"):
        with pytest.raises(ValueError, match="https"):
            RemoteVault(url, secret)
    with pytest.raises(ValueError, match="https"):
        RemoteVault("ftp://vault.internal", secret, allow_http=True)
    RemoteVault("https://vault.internal:8081", secret)
    RemoteVault("http://127.0.0.1:8081", secret, allow_http=True)  # development only


async def test_pci_4_2_1_the_api_refuses_an_http_vault_url_in_production(tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path,
        development=False,
        auth={"key_hash_secret": secrets.token_urlsafe(32)},
        vault={"url": "http://127.0.0.1:8081", "service_secret": secrets.token_urlsafe(48)},
    )
    app = create_app(settings, background=False)
    with pytest.raises(ValueError, match="https"):
        async with app.router.lifespan_context(app):
            pass


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_pci_7_2_1_sqlite_files_are_created_owner_only(tmp_path: Path, open_umask: None):
    path = tmp_path / "strongroom.db"
    url = f"sqlite+aiosqlite:///{path}"
    upgrade(url)  # what `serve` and `migrate` do first on the embedded default

    async def write() -> dict[str, int]:
        db = Database(url)
        try:
            async with db.tx() as conn:
                await conn.execute(sa.text("CREATE TABLE probe (x INTEGER)"))
                await conn.execute(sa.text("INSERT INTO probe VALUES (1)"))
            return _modes(tmp_path)  # while open: the -wal and -shm files exist
        finally:
            await db.dispose()

    modes = asyncio.run(write())
    assert {"strongroom.db", "strongroom.db-wal", "strongroom.db-shm"} <= set(modes)
    assert set(modes.values()) == {0o600}, modes


async def test_pci_7_2_1_an_existing_world_readable_database_is_narrowed(tmp_path: Path, open_umask: None):
    path = tmp_path / "strongroom.db"
    sqlite3.connect(path).close()
    path.chmod(0o644)
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        async with db.read() as conn:
            await conn.execute(sa.text("SELECT 1"))
    finally:
        await db.dispose()
    assert set(_modes(tmp_path).values()) == {0o600}
