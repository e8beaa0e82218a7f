"""End-to-end fixtures: a REAL `strongroom serve` process on a free port, reached over TCP.

The server runs on SQLite and, when STRONGROOM_TEST_DATABASE_URL is set (an admin URL such as
postgresql+asyncpg://postgres@127.0.0.1:5432/test), also on a fresh PostgreSQL database created
for the run and dropped WITH (FORCE) afterwards. Both merchants are created through the CLI
(`merchants create --json`), exactly as an operator would, before the server starts.

The server's stdout/stderr go to a file; when it fails to start, or a test using it fails, the
tail of that file is attached to the report.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

PG_ADMIN_URL = os.environ.get("STRONGROOM_TEST_DATABASE_URL")
# Built at import time: PostgreSQL is a parameter only when the variable is set (never skipped).
BACKENDS = ["sqlite", "postgres"] if PG_ADMIN_URL else ["sqlite"]

STARTUP_TIMEOUT_S = 30.0
CLI_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 60


@dataclass(frozen=True)
class Server:
    backend: str
    url: str
    merchant_id: str
    secret_key: str
    # A second merchant: its keys must never see the first one's objects.
    other_merchant_id: str
    other_secret_key: str
    log_path: Path

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:])


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from strongroom.cli import main; main()", *args]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(database_url: str | None) -> dict[str, str]:
    # Only this run's settings: nothing inherited from a developer's STRONGROOM_* variables.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRONGROOM_")}
    if database_url is not None:
        env["STRONGROOM_DATABASE_URL"] = database_url
    env["PYTHONUNBUFFERED"] = "1"
    # Fuzzing sends thousands of requests from one address to the keyless routes: limits that
    # would answer most of them 429 would keep it from their logic (the limits have own tests).
    for name in ("CARD_FORM_PER_IP", "CARD_FORM_PER_SESSION", "THREEDS_PER_IP", "THREEDS_PER_INTENT"):
        env[f"STRONGROOM_RATELIMIT__{name}"] = "1000000"
    return env


def _run_cli(env: dict[str, str], log_path: Path, *args: str) -> str:
    done = subprocess.run(_cli(*args), env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    with log_path.open("a") as log:
        log.write(f"$ strongroom {' '.join(args)}\n{done.stderr}")
    if done.returncode != 0:
        raise RuntimeError(f"strongroom {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def _create_merchant(env: dict[str, str], log_path: Path, data_dir: Path, name: str) -> tuple[str, str]:
    out = _run_cli(env, log_path, "merchants", "create", name, "--json", "--data-dir", str(data_dir))
    line = next(line for line in reversed(out.splitlines()) if line.startswith("{"))
    created = json.loads(line)
    return created["id"], created["secret_key"]


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await engine.dispose()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # The server runs in its own session: signal its whole process group (uvicorn workers too).
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, verify: Any = True) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log tail:\n{_tail(log_path, LOG_TAIL_LINES)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0, verify=verify).status_code == 200:
                return
            last_error = "healthz not 200"
        except httpx.HTTPError as exc:
            last_error = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(
        f"server not healthy after {STARTUP_TIMEOUT_S}s ({last_error}); log tail:\n{_tail(log_path, LOG_TAIL_LINES)}"
    )


@pytest.fixture(scope="session", params=BACKENDS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A running server with two merchants; shared by every e2e module of the session."""
    backend: str = request.param
    root = tmp_path_factory.mktemp(f"e2e-{backend}")
    data_dir = root / "data"
    log_path = root / "server.log"
    db_name: str | None = None
    database_url: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    try:
        if backend == "postgres":
            assert PG_ADMIN_URL is not None
            db_name = "strongroom_e2e_" + secrets.token_hex(6)
            asyncio.run(_admin(PG_ADMIN_URL, f'CREATE DATABASE "{db_name}"'))
            database_url = make_url(PG_ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
        env = _environment(database_url)
        if database_url is not None:
            _run_cli(env, log_path, "migrate", "--data-dir", str(data_dir))
        merchant_id, key = _create_merchant(env, log_path, data_dir, "E2E")
        other_id, other_key = _create_merchant(env, log_path, data_dir, "E2E other")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                _cli("serve", "--port", str(port), "--data-dir", str(data_dir)),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_healthy(proc, url, log_path)
        yield Server(backend, url, merchant_id, key, other_id, other_key, log_path)
    finally:
        if proc is not None:
            _stop(proc)
        if db_name is not None:
            assert PG_ADMIN_URL is not None
            asyncio.run(_admin(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    funcargs = getattr(item, "funcargs", {})
    srv = funcargs.get("server")
    if report.failed and isinstance(srv, Server):
        report.sections.append((f"server log tail ({srv.backend})", srv.log_tail()))
    return report
