"""A REAL server process killed mid-payment (SECURITY.md I3: crash mid-payment → one charge).

`strongroom serve` runs as a subprocess with the failpoint `exit_after_processor_call`: the
process exits (code 75) after the sandbox processor authorized and before the commit that
records the outcome — the worst moment to die. The server is then restarted without the
failpoint and the payment must end `succeeded` with exactly one authorization at the processor,
whether the client retries with its Idempotency-Key or never comes back (the recovery sweep).

Runs on SQLite (the embedded default, a file in the data dir) and, with
STRONGROOM_TEST_DATABASE_URL set, on a fresh PostgreSQL database created, migrated with
`strongroom migrate`, and dropped for each test. Every wait is bounded; every server process is
stopped in a `finally`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

PG_ADMIN_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
BACKENDS = ["sqlite", "postgres"] if PG_ADMIN_URL else ["sqlite"]

CLI_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 30.0
LOCK_TIMEOUT_S = 1.0
FAILPOINT_EXIT_CODE = 75  # processing.failpoint: os._exit(75)
PAYMENT = {"amount": "4200", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from strongroom.cli import main; main()", *args]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


async def _pg_scalar(url: str, sql: str, params: dict[str, Any]) -> Any:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(sa.text(sql), params)).scalar()
    finally:
        await engine.dispose()


@dataclass
class Deployment:
    backend: str
    data_dir: Path
    log_path: Path
    env: dict[str, str]
    database_url: str | None
    merchant_id: str
    secret_key: str

    def scalar(self, sql: str, **params: Any) -> Any:
        """One value from the server's database, read directly (not through the API)."""
        if self.database_url is not None:
            return asyncio.run(_pg_scalar(self.database_url, sql, params))
        with closing(sqlite3.connect(self.data_dir / "strongroom.db", timeout=30)) as conn:
            row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def authorizations(self) -> int:
        """Successful authorizations at the sandbox processor for this merchant."""
        return int(self.scalar("SELECT count(*) FROM sandbox_charges WHERE merchant_id = :m", m=self.merchant_id))

    def authorize_operations(self) -> int:
        sql = "SELECT count(*) FROM sandbox_operations WHERE merchant_id = :m AND kind = 'authorize'"
        return int(self.scalar(sql, m=self.merchant_id))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _run_cli(env: dict[str, str], log_path: Path, *args: str) -> str:
    done = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    with log_path.open("a") as log:
        log.write(f"$ strongroom {' '.join(args)}\n{done.stderr}\n")
    assert done.returncode == 0, f"strongroom {' '.join(args)} exited {done.returncode}:\n{done.stderr}"
    return done.stdout


@pytest.fixture(params=BACKENDS)
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """A data dir (and, on PostgreSQL, a migrated database) with one merchant made by the CLI."""
    backend: str = request.param
    data_dir = tmp_path / "data"
    log_path = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRONGROOM_")}
    env["PYTHONUNBUFFERED"] = "1"
    db_name: str | None = None
    database_url: str | None = None
    try:
        if backend == "postgres":
            assert PG_ADMIN_URL is not None
            db_name = "strongroom_crash_" + secrets.token_hex(6)
            asyncio.run(_admin(PG_ADMIN_URL, f'CREATE DATABASE "{db_name}"'))
            database_url = make_url(PG_ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
            env["STRONGROOM_DATABASE_URL"] = database_url
            _run_cli(env, log_path, "migrate", "--data-dir", str(data_dir))
        out = _run_cli(env, log_path, "merchants", "create", "Crash test", "--json", "--data-dir", str(data_dir))
        created = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
        yield Deployment(backend, data_dir, log_path, env, database_url, created["id"], created["secret_key"])
    finally:
        if db_name is not None:
            assert PG_ADMIN_URL is not None
            asyncio.run(_admin(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own session: uvicorn and its children
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def running_server(dep: Deployment, **settings: str) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client]]:
    """`strongroom serve` with extra STRONGROOM_* settings; yields the process and a client."""
    env = dict(dep.env)
    env.update({f"STRONGROOM_{name.upper()}": value for name, value in settings.items()})
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with dep.log_path.open("ab") as log:
        log.write(f"--- serve {settings}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            _cli("serve", "--port", str(port), "--data-dir", str(dep.data_dir)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        headers = {"Authorization": f"Bearer {dep.secret_key}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30.0) as client:
            _wait_healthy(proc, client, dep)
            yield proc, client
    finally:
        _stop(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], client: httpx.Client, dep: Deployment) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}:\n{dep.log_tail()}"
        try:
            if client.get("/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{dep.log_tail()}")


def _crash_mid_payment(dep: Deployment, key: str) -> float:
    """Sends the payment to a server armed with the failpoint; returns when it died (monotonic)."""
    armed = {"payments__failpoint": "exit_after_processor_call", "idempotency__lock_timeout_s": str(LOCK_TIMEOUT_S)}
    with running_server(dep, **armed) as (proc, client):
        with pytest.raises(httpx.TransportError):  # the connection drops: no response at all
            client.post("/v1/payment_intents", data=PAYMENT, headers={"Idempotency-Key": key})
        code = proc.wait(timeout=EXIT_TIMEOUT_S)
        died = time.monotonic()
        assert code == FAILPOINT_EXIT_CODE, f"exit code {code}:\n{dep.log_tail()}"
    # Between the crash and any restart: the processor charged once, nothing recorded it.
    assert dep.authorizations() == 1
    assert dep.authorize_operations() == 1
    intent_id = dep.scalar(
        # The key is stored only as its HMAC: the merchant's newest key is this request's.
        "SELECT resource_id FROM idempotency_keys WHERE merchant_id = :m ORDER BY created DESC LIMIT 1",
        m=dep.merchant_id,
    )
    assert intent_id is not None, "the recovery point was committed before the processor call"
    status = dep.scalar(
        "SELECT status FROM payment_intents WHERE merchant_id = :m AND id = :i", m=dep.merchant_id, i=intent_id
    )
    assert status == "processing"
    assert (
        dep.scalar(
            "SELECT response_status FROM idempotency_keys WHERE merchant_id = :m ORDER BY created DESC LIMIT 1",
            m=dep.merchant_id,
        )
        is None
    )
    return died


def _only_intent(client: httpx.Client) -> dict[str, Any]:
    listed = client.get("/v1/payment_intents", params={"limit": 10})
    assert listed.status_code == 200, listed.text
    data: list[dict[str, Any]] = listed.json()["data"]
    assert len(data) == 1, [i["id"] for i in data]
    return data[0]


def test_i3_server_killed_after_processor_call_retry_with_same_key_charges_once(deployment: Deployment) -> None:
    dep = deployment
    key = "crash_" + secrets.token_hex(8)
    died = _crash_mid_payment(dep, key)

    with running_server(dep, idempotency__lock_timeout_s=str(LOCK_TIMEOUT_S)) as (_proc, client):
        time.sleep(max(0.0, died + LOCK_TIMEOUT_S + 0.3 - time.monotonic()))  # the dead lock is now stale
        retried = client.post("/v1/payment_intents", data=PAYMENT, headers={"Idempotency-Key": key})
        assert retried.status_code == 200, f"{retried.text}\n{dep.log_tail()}"
        assert "Idempotent-Replayed" not in retried.headers
        body = retried.json()
        assert body["status"] == "succeeded"
        assert body["amount_received"] == 4200

        got = client.get(f"/v1/payment_intents/{body['id']}")
        assert got.status_code == 200
        assert got.json()["status"] == "succeeded"
        assert _only_intent(client)["id"] == body["id"]
        charges = client.get("/v1/charges", params={"limit": 10}).json()["data"]
        assert [(c["payment_intent"], c["status"]) for c in charges] == [(body["id"], "succeeded")]
        assert dep.authorizations() == 1
        assert dep.authorize_operations() == 1

        replay = client.post("/v1/payment_intents", data=PAYMENT, headers={"Idempotency-Key": key})
        assert replay.status_code == 200
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.content == retried.content
    assert dep.authorizations() == 1


def test_i3_server_killed_mid_payment_recovery_sweep_resolves_without_retry(deployment: Deployment) -> None:
    """The client never retries: the restarted server's background recovery sweep asks the
    processor about the attempt under its original key and records the authorization."""
    dep = deployment
    key = "crash_" + secrets.token_hex(8)
    _crash_mid_payment(dep, key)

    sweep = {
        "payments__recovery_after_s": "1",
        "payments__recovery_interval_s": "0.5",
        "idempotency__lock_timeout_s": str(LOCK_TIMEOUT_S),
    }
    with running_server(dep, **sweep) as (_proc, client):
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        intent = _only_intent(client)
        while intent["status"] == "processing" and time.monotonic() < deadline:
            time.sleep(0.2)
            intent = _only_intent(client)
        assert intent["status"] == "succeeded", f"{intent['status']}\n{dep.log_tail()}"
        assert intent["amount_received"] == 4200
        assert dep.authorizations() == 1
        assert dep.authorize_operations() == 1
        charges = client.get("/v1/charges", params={"limit": 10}).json()["data"]
        assert [(c["payment_intent"], c["status"]) for c in charges] == [(intent["id"], "succeeded")]
        events = client.get("/v1/events", params={"limit": 100}).json()["data"]
        assert [e["type"] for e in events].count("payment_intent.succeeded") == 1

        # A late retry under the original key finds the payment done: the same intent, no new charge.
        late = client.post("/v1/payment_intents", data=PAYMENT, headers={"Idempotency-Key": key})
        assert late.status_code == 200, late.text
        assert late.json()["id"] == intent["id"]
        assert late.json()["status"] == "succeeded"
        again = client.post("/v1/payment_intents", data=PAYMENT, headers={"Idempotency-Key": key})
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.content == late.content
    assert dep.authorizations() == 1
