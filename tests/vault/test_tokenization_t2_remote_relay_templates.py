"""The vault's request templates hold across the process boundary too (issue 17 item 4; SECURITY.md
T2, segmentation): a real `strongroom vault serve` process, its own SQLite database, TLS, and a
real local HTTP server as the processor (listed as a local test origin, so the sandbox template
may reach its `/sandbox` mount). What a compromised api host could send over the signed channel —
the finding's raw request, a placeholder in a value, a card field, a header of its choosing — is
refused by the vault itself, audited in the vault's database, and never reaches the processor."""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _wait_healthy
from tests.vault.capture_server import CaptureServer, capture_server

from strongroom import tls
from strongroom.sensitive import Secret
from strongroom.vault import channel
from strongroom.vault.relay import CardFacts, RelayCall, TemplateRefused
from strongroom.vault.remote import RELAY_PATH, RemoteRelay, RemoteVault
from strongroom.vault.templates import SANDBOX_AUTHORIZE, SANDBOX_MOUNT

AMEX = "378282246310005"
AMEX_CVC = "4242"
MERCHANT = "acct_remote_t2"


@dataclass(frozen=True)
class Vault:
    url: str
    secret: str
    db: Path
    verify: ssl.SSLContext
    processor: CaptureServer


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vault]:
    root = tmp_path_factory.mktemp("remote-t2")
    port, secret, db = _free_port(), secrets.token_urlsafe(48), root / "vault.db"
    cert = tls.write_dev_certificate(root / "tls", ())
    with capture_server() as processor:
        env = _environment(None) | {
            "STRONGROOM_VAULT__SERVICE_SECRET": secret,
            "STRONGROOM_VAULT__DATABASE_URL": f"sqlite+aiosqlite:///{db}",
            "STRONGROOM_VAULT__RELAY_LOCAL_TEST_ORIGINS": json.dumps([processor.url]),
        }
        args = ["vault", "serve", "--port", str(port), "--data-dir", str(root)]
        args += ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)]
        log = root / "vault.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(_cli(*args), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            verify = ssl.create_default_context(cafile=str(cert.cert_file))
            _wait_healthy(proc, f"https://127.0.0.1:{port}", log, verify=verify)
            yield Vault(f"https://127.0.0.1:{port}", secret, db, verify, processor)
        finally:
            _stop(proc)


async def _with_remote(v: Vault, work: Any) -> Any:
    remote = RemoteVault(v.url, Secret(v.secret.encode()), verify=v.verify)
    try:
        return await work(remote)
    finally:
        await remote.aclose()


def _tokenize(v: Vault) -> str:
    async def work(remote: RemoteVault) -> str:
        # The api's connection is not used by a remote vault: the card goes to the vault's database.
        stored = await remote.tokenize(None, MERCHANT, Secret(AMEX), Secret(AMEX_CVC))  # type: ignore[arg-type]
        return stored.token

    token: str = asyncio.run(_with_remote(v, work))
    return token


def _relay(v: Vault, token: str, call: RelayCall) -> Any:
    async def work(remote: RemoteVault) -> Any:
        card = CardFacts(12, 2034)
        return await RemoteRelay(remote).send(
            actor="connector:sandbox", merchant_id=MERCHANT, token=token, card=card, call=call
        )

    return asyncio.run(_with_remote(v, work))


def _values(token: str, **changes: Any) -> dict[str, Any]:
    values = {"idempotency_key": "pi_1:auth:1", "merchant_id": MERCHANT, "amount_minor": 1500, "currency": "usd"}
    return values | {"capture": True, "livemode": False, "authentication": None, "card.token": token} | changes


def _audit(v: Vault, token: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(v.db) as conn:
        query = "SELECT outcome, method, path FROM vault_relay_audit WHERE token = ? ORDER BY created, id"
        return [tuple(row) for row in conn.execute(query, (token,))]


def test_t2_the_vault_process_refuses_steering_and_audits_it(vault):
    token = _tokenize(vault)
    base = vault.processor.url + SANDBOX_MOUNT
    attempts = [
        (RelayCall(SANDBOX_AUTHORIZE.id, _values(token, currency="{{card.number}}"), base_url=base), "currency"),
        (
            RelayCall(SANDBOX_AUTHORIZE.id, _values(token, **{"card.number": "4242424242424242"}), base_url=base),
            "card.number",
        ),
        (RelayCall(SANDBOX_AUTHORIZE.id, _values(token), {"x-cvc": "{{card.cvc}}"}, base), "x-cvc"),
        (RelayCall(SANDBOX_AUTHORIZE.id, _values(token, description="x"), base_url=base), "description"),
    ]
    for call, param in attempts:
        with pytest.raises(TemplateRefused) as refused:
            _relay(vault, token, call)
        assert refused.value.param == param

    # The finding's raw request, signed as the api would sign it: the vault takes templates only.
    raw = {
        "actor": "connector:sandbox",
        "merchant_id": MERCHANT,
        "token": token,
        "exp_month": 12,
        "exp_year": 2034,
        "request": {
            "method": "POST",
            "url": base + "/v1/charges",
            "body": "description={{card.number}}&metadata[cvc]={{card.cvc}}",
            "headers": {},
        },
    }
    body = orjson.dumps(raw)
    headers = {
        "content-type": "application/json",
        channel.HEADER: channel.sign(Secret(vault.secret.encode()), "POST", RELAY_PATH, body),
    }
    answer = httpx.post(vault.url + RELAY_PATH, content=body, headers=headers, verify=vault.verify)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "relay_template_refused"

    assert vault.processor.received == []  # nothing reached the processor
    refused_rows = [("template_refused", "POST", "/v1/authorizations")] * 4 + [("template_refused", "", "")]
    assert _audit(vault, token) == refused_rows

    # The same card through the template, as the sandbox connector sends it: it arrives, in its field.
    sent = _relay(vault, token, RelayCall(SANDBOX_AUTHORIZE.id, _values(token), base_url=base))
    (got,) = vault.processor.received
    assert (got.method, got.path) == ("POST", "/sandbox/v1/authorizations")
    assert orjson.loads(got.body)["card"] == {
        "token": token,
        "number": AMEX,
        "cvc": AMEX_CVC,
        "exp_month": "12",
        "exp_year": "2034",
    }
    assert sent.status_code == 200 and AMEX not in sent.body and AMEX_CVC not in orjson.loads(sent.body)["echo"]
    assert _audit(vault, token)[-1] == ("sent", "POST", "/v1/authorizations")
