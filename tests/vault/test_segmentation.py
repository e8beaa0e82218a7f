"""Segmentation (issue 4 item 9): the vault as its own process (`strongroom vault serve`) with its
own database, reached by the api only over the signed channel.

Two real processes on SQLite, each with its own database file: a payment made through the api
stores its card in the vault's database only, and reaches the sandbox processor through the
vault's relay (the sandbox is the api's /sandbox endpoint, configured on the vault as a local
test processor); the vault refuses unsigned, mis-signed, replayed and re-targeted requests."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from tests.e2e.conftest import _cli, _create_merchant, _environment, _free_port, _stop, _tail, _wait_healthy

from strongroom import tls
from strongroom.errors import ResourceMissing
from strongroom.sensitive import Secret
from strongroom.vault import channel
from strongroom.vault.relay import CardFacts, RelayCall, RelayRefused
from strongroom.vault.remote import CARDS_PATH, RemoteRelay, RemoteVault

VISA = "4242424242424242"


@dataclass(frozen=True)
class Deployment:
    api_url: str
    vault_url: str
    secret: str
    secret_key: str
    api_db: Path
    vault_db: Path
    log: Path
    vault_tls: ssl.SSLContext


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(_cli(*args), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("segmented")
    api_dir, vault_dir, log = root / "api", root / "vault", root / "processes.log"
    api_port, vault_port = _free_port(), _free_port()
    secret = secrets.token_urlsafe(48)
    api_db, vault_db = api_dir / "strongroom.db", vault_dir / "vault.db"
    vault_env = _environment(None) | {
        "STRONGROOM_VAULT__SERVICE_SECRET": secret,
        "STRONGROOM_VAULT__DATABASE_URL": f"sqlite+aiosqlite:///{vault_db}",
        # The api's sandbox endpoint, plain HTTP on loopback: allowed only because it is listed.
        "STRONGROOM_VAULT__RELAY_LOCAL_TEST_ORIGINS": json.dumps([f"http://127.0.0.1:{api_port}"]),
    }
    api_env = _environment(None) | {
        "STRONGROOM_VAULT__SERVICE_SECRET": secret,
        "STRONGROOM_VAULT__URL": f"http://127.0.0.1:{vault_port}",
        "STRONGROOM_PAYMENTS__SANDBOX_URL": f"http://127.0.0.1:{api_port}/sandbox",
    }
    vault_dir.mkdir()
    api_dir.mkdir()
    # The vault listens with TLS only; the api trusts exactly its certificate (a private CA).
    cert = tls.write_dev_certificate(vault_dir / "tls", ())
    api_env["STRONGROOM_VAULT__URL"] = f"https://127.0.0.1:{vault_port}"
    api_env["STRONGROOM_VAULT__TLS_CA_FILE"] = str(cert.cert_file)
    _, secret_key = _create_merchant(api_env, log, api_dir, "Segmented shop")
    vault_args = ["vault", "serve", "--port", str(vault_port), "--data-dir", str(vault_dir)]
    vault_args += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
    procs = [
        _start(
            vault_args,
            vault_env,
            log,
        ),
        _start(["serve", "--port", str(api_port), "--data-dir", str(api_dir)], api_env, log),
    ]
    try:
        vault_tls = ssl.create_default_context(cafile=str(cert.cert_file))
        _wait_healthy(procs[0], f"https://127.0.0.1:{vault_port}", log, verify=vault_tls)
        _wait_healthy(procs[1], f"http://127.0.0.1:{api_port}", log)
        yield Deployment(
            f"http://127.0.0.1:{api_port}",
            f"https://127.0.0.1:{vault_port}",
            secret,
            secret_key,
            api_db,
            vault_db,
            log,
            vault_tls,
        )
    finally:
        for proc in procs:
            _stop(proc)


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        exists = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,))
        if exists.fetchone()[0] == 0:
            return 0
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 (fixed table names)


def _pay(d: Deployment, number: str) -> httpx.Response:
    auth = (d.secret_key, "")
    pm = httpx.post(
        f"{d.api_url}/v1/payment_methods",
        auth=auth,
        data={
            "type": "card",
            "card[number]": number,
            "card[exp_month]": "12",
            "card[exp_year]": "2034",
            "card[cvc]": "123",
        },
    )
    assert pm.status_code == 200, pm.text
    return httpx.post(
        f"{d.api_url}/v1/payment_intents",
        auth=auth,
        data={"amount": "1500", "currency": "usd", "payment_method": pm.json()["id"], "confirm": "true"},
    )


def test_payments_keep_card_data_in_the_vaults_own_database(deployment):
    ok = _pay(deployment, VISA)
    assert ok.status_code == 200, ok.text + _tail(deployment.log, 40)
    assert ok.json()["status"] == "succeeded"
    declined = _pay(deployment, "4000000000000002")
    assert declined.status_code == 402, declined.text
    assert declined.json()["error"]["decline_code"] == "generic_decline"  # the PAN crossed the relay

    assert _count(deployment.vault_db, "vault_cards") == 2
    assert _count(deployment.api_db, "vault_cards") == 0
    assert _count(deployment.vault_db, "vault_relay_audit") == 2
    assert _count(deployment.api_db, "payment_methods") == 2
    for path in deployment.api_db.parent.glob("strongroom.db*"):
        assert VISA.encode() not in path.read_bytes()


def _signed(d: Deployment, body: bytes, *, secret: str | None = None, path: str = CARDS_PATH) -> str:
    return channel.sign(Secret((secret or d.secret).encode()), "POST", path, body)


def test_the_vault_accepts_only_signed_fresh_requests_for_their_own_path(deployment):
    url = deployment.vault_url + CARDS_PATH
    body = orjson.dumps({"merchant_id": "acct_test", "number": VISA, "cvc": None})
    json_type = {"content-type": "application/json"}

    assert httpx.post(url, content=body, headers=json_type, verify=deployment.vault_tls).status_code == 401
    wrong = _signed(deployment, body, secret=secrets.token_urlsafe(48))
    assert (
        httpx.post(
            url, content=body, headers=json_type | {channel.HEADER: wrong}, verify=deployment.vault_tls
        ).status_code
        == 401
    )
    elsewhere = _signed(deployment, body, path="/internal/v1/relay")
    assert (
        httpx.post(
            url, content=body, headers=json_type | {channel.HEADER: elsewhere}, verify=deployment.vault_tls
        ).status_code
        == 401
    )
    stale = channel.sign(Secret(deployment.secret.encode()), "POST", CARDS_PATH, body, now=time.time() - 600)
    assert (
        httpx.post(
            url, content=body, headers=json_type | {channel.HEADER: stale}, verify=deployment.vault_tls
        ).status_code
        == 401
    )
    tampered = _signed(deployment, body)
    altered = body.replace(b"acct_test", b"acct_evil")
    assert (
        httpx.post(
            url, content=altered, headers=json_type | {channel.HEADER: tampered}, verify=deployment.vault_tls
        ).status_code
        == 401
    )

    good = _signed(deployment, body)
    first = httpx.post(url, content=body, headers=json_type | {channel.HEADER: good}, verify=deployment.vault_tls)
    assert first.status_code == 200, first.text
    assert first.json()["token"].startswith("card_") and VISA not in first.text
    replay = httpx.post(url, content=body, headers=json_type | {channel.HEADER: good}, verify=deployment.vault_tls)
    assert replay.status_code == 401


def test_p8_the_vault_listener_speaks_tls_13_only(deployment):
    host, port = "127.0.0.1", int(deployment.vault_url.rsplit(":", 1)[1])
    old = ssl.create_default_context(cafile=None)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, port), timeout=5) as raw, pytest.raises(ssl.SSLError):
        old.wrap_socket(raw, server_hostname=host)
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        deployment.vault_tls.wrap_socket(raw, server_hostname=host) as tls_socket,
    ):
        assert tls_socket.version() == "TLSv1.3"


def test_the_channel_refuses_a_short_secret():
    with pytest.raises(ValueError, match="32 bytes"):
        channel.Verifier(Secret(b"too short"))
    assert os.environ.get("STRONGROOM_VAULT__SERVICE_SECRET") is None  # nothing leaks into the test process


def test_remote_relay_failures_reach_the_api_as_the_in_process_ones_do(deployment):
    async def attempt(base_url: str, token: str) -> None:
        remote = RemoteVault(deployment.vault_url, Secret(deployment.secret.encode()), verify=deployment.vault_tls)
        call = RelayCall("sandbox.authorize", {"amount_minor": 1500}, base_url=base_url)
        try:
            await RemoteRelay(remote).send(
                actor="test", merchant_id="acct_test", token=token, card=CardFacts(12, 2034), call=call
            )
        finally:
            await remote.aclose()

    # Off the vault's allowlist: refused there, nothing sent; a token the vault does not know: 404.
    with pytest.raises(RelayRefused):
        asyncio.run(attempt("https://evil.example", "card_unknown"))
    with pytest.raises(ResourceMissing):
        asyncio.run(attempt(f"{deployment.api_url}/sandbox", "card_unknown"))
