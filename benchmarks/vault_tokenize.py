"""Vault tokenization micro-benchmark, runnable alone (needs SoftHSM2: apt-get install softhsm2):

    python benchmarks/vault_tokenize.py [--count 20000] [--postgres-url URL] [--json out.json]

Prints JSON: tokenizations per second in one process with the PKCS#11 keystore on a SoftHSM2 token
of its own (created in a temporary directory), for
- `crypto_only`: what a tokenization costs in the vault itself (fingerprint HMAC under the cached
  merchant key, DEK budget accounting, AES-256-GCM with a fresh nonce), no database;
- `sqlite` / `postgresql`, `tx_per_card`: one transaction (one commit) per tokenization, as an API
  request does; on PostgreSQL also with concurrent requests, as an API worker serves them;
- `batched`: 100 tokenizations per transaction, the vault's cost with the commit amortised;
- `relay`: what the relay adds to a card-bearing processor request (open the card, fill the
  placeholders, redact the answer, write the audit row), median and p99, against the same request
  sent directly to the same in-process processor.
`hsm_calls` counts keystore calls during each run: with HSM round trips off the per-request path
it stays at the DEK reservations (one per `vault.dek_reserve_block` cards, none for the HSM
itself while the DEK is cached) plus one fingerprint key per merchant.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "bench-user-pin"
CARDS = ("4242424242424242", "5555555555554444", "378282246310005")


def _softhsm(workdir: Path) -> str:
    util = shutil.which("softhsm2-util")
    if util is None or not MODULE.exists():
        raise SystemExit("SoftHSM2 is required: apt-get install softhsm2")
    (workdir / "tokens").mkdir()
    conf = workdir / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {workdir / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read when the PKCS#11 library is loaded
    labels = []
    for name in ("sqlite", "postgresql"):
        label = f"bench-{name}"
        argv = [util, "--init-token", "--free", "--label", label, "--so-pin", "bench-so-pin", "--pin", PIN]
        subprocess.run(argv, check=True, capture_output=True)
        labels.append(label)
    return workdir.name


class CountingKeystore:
    """Counts calls into the real keystore (no behaviour of its own)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls = 0
        self.name = inner.name
        self.wrap_mechanism = inner.wrap_mechanism

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if not callable(target):
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return target(*args, **kwargs)

        return counted


async def _rate(count: int, run: Callable[[int], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await run(count)
    return count / (time.perf_counter() - started)


async def _measure(url: str, token: str, data_dir: Path, count: int, concurrency: int) -> dict[str, Any]:
    from strongroom.sensitive import Secret
    from strongroom.settings import Settings
    from strongroom.store.db import Database
    from strongroom.vault.keystore import open_keystore
    from strongroom.vault.service import CvcCache, Vault, seal

    settings = Settings(data_dir=data_dir, database_url=url, hsm_module=MODULE, hsm_token_label=token, hsm_pin=PIN)
    db = Database(url, pool_size=max(concurrency, 5))
    keystore = CountingKeystore(open_keystore(settings))
    vault = Vault(db, keystore, CvcCache(60.0, 1000), settings.vault)
    pans = [Secret(CARDS[i % 3]) for i in range(64)]
    merchant = "acct_bench_" + secrets.token_hex(4)
    result: dict[str, Any] = {}
    try:
        async with db.tx() as conn:  # warm-up: KEK, DEK, fingerprint key
            await vault.tokenize(conn, merchant, pans[0], None)

        async def crypto_only(n: int) -> None:
            async with db.tx() as conn:
                for i in range(n):
                    pan = pans[i % 64]
                    await vault.fingerprint(merchant, pan)
                    _, aead = await vault.keys.for_encryption(conn)
                    seal(aead, merchant, "card_" + secrets.token_urlsafe(24), pan)

        async def tx_per_card(n: int) -> None:
            for i in range(n):
                async with db.tx() as conn:
                    await vault.tokenize(conn, merchant, pans[i % 64], None)

        async def batched(n: int) -> None:
            for start in range(0, n, 100):
                async with db.tx() as conn:
                    for i in range(start, min(start + 100, n)):
                        await vault.tokenize(conn, merchant, pans[i % 64], None)

        async def concurrent(n: int) -> None:
            await asyncio.gather(*(tx_per_card(n // concurrency) for _ in range(concurrency)))

        runs: list[tuple[str, Callable[[int], Awaitable[None]]]] = [
            ("crypto_only", crypto_only),
            ("tx_per_card", tx_per_card),
            ("batched", batched),
        ]
        if not db.is_sqlite:
            runs.append((f"tx_per_card_{concurrency}_concurrent", concurrent))
        for name, run in runs:
            before = keystore.calls
            rate = await _rate(count, run)
            result[name] = {"tokenizations_per_s": round(rate), "count": count, "hsm_calls": keystore.calls - before}
        before = keystore.calls
        result["relay"] = await _relay_overhead(vault, db, merchant, min(count, 2000))
        result["relay"]["hsm_calls"] = keystore.calls - before
    finally:
        vault.close()
        await db.dispose()
    return result


class _Processor:
    """A processor that answers at once, in-process: what is measured is the relay's own cost."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"status": "approved", "last4": "4242"}'})


async def _relay_overhead(vault: Any, db: Any, merchant: str, count: int) -> dict[str, Any]:
    """Median and p99 of a card-bearing request sent directly (the PAN in the caller's hands, as
    without a vault) and through `Relay.send` (open the card, fill the placeholders, send, redact
    the answer, write the audit row), to the same in-process processor. The difference is what the
    relay adds to an authorization."""
    import statistics

    from strongroom.sensitive import Secret
    from strongroom.vault.relay import Allowlist, CardFacts, Relay, RelayCall, _call_local
    from strongroom.vault.templates import CardValue, Encoding, RequestTemplate, TemplateRegistry

    origin = "https://processor.bench"
    processor = _Processor()
    charge = RequestTemplate(
        id="bench.charge",
        connector="bench",
        method="POST",
        path="/v1/charges",
        encoding=Encoding.JSON,
        card_fields={"number": CardValue.NUMBER, "exp_month": CardValue.EXP_MONTH, "exp_year": CardValue.EXP_YEAR},
        value_fields=frozenset({"amount"}),
        endpoints=(origin,),
    )
    relay = Relay(
        vault,
        db,
        Allowlist([origin]),
        timeout_s=5.0,
        local_apps={origin: processor},
        templates=TemplateRegistry([charge]),
    )
    async with db.tx() as conn:
        token = (await vault.tokenize(conn, merchant, Secret(CARDS[0]), None)).token
    call = RelayCall(charge.id, {"amount": 1000})
    plain = json.dumps({"amount": 1000, "number": CARDS[0], "exp_month": "12", "exp_year": "2034"})
    timings: dict[str, list[float]] = {"direct": [], "relay": []}
    try:
        for _ in range(count):
            started = time.perf_counter()
            await _call_local(
                processor, "POST", origin + "/v1/charges", {"content-type": "application/json"}, plain.encode()
            )
            timings["direct"].append(time.perf_counter() - started)
            started = time.perf_counter()
            await relay.send(actor="bench", merchant_id=merchant, token=token, card=CardFacts(12, 2034), call=call)
            timings["relay"].append(time.perf_counter() - started)
    finally:
        await relay.aclose()

    def ms(values: list[float], q: float) -> float:
        return round(sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

    median = {name: statistics.median(values) for name, values in timings.items()}
    return {
        "count": count,
        "direct_ms": {"p50": ms(timings["direct"], 0.5), "p99": ms(timings["direct"], 0.99)},
        "relay_ms": {"p50": ms(timings["relay"], 0.5), "p99": ms(timings["relay"], 0.99)},
        "overhead_median_ms": round((median["relay"] - median["direct"]) * 1000, 3),
    }


def main(
    count: Annotated[int, typer.Option(help="Tokenizations per run")] = 20_000,
    postgres_url: Annotated[str, typer.Option(help="PostgreSQL admin URL")] = (
        "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    ),
    concurrency: Annotated[int, typer.Option(help="Concurrent requests in the PostgreSQL run")] = 16,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the JSON here")] = None,
) -> None:
    import structlog
    from sqlalchemy.engine import make_url

    from strongroom.store.migrate import upgrade

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is the JSON
    workdir = Path(tempfile.mkdtemp(prefix="strongroom-bench-vault-"))
    _softhsm(workdir)
    report: dict[str, Any] = {"benchmark": "vault_tokenize", "keystore": "pkcs11 (SoftHSM2)", "processes": 1}
    sqlite_url = f"sqlite+aiosqlite:///{workdir / 'bench.db'}"
    upgrade(sqlite_url)
    report["sqlite"] = asyncio.run(_measure(sqlite_url, "bench-sqlite", workdir, count, 1))

    name = "strongroom_bench_vault_" + secrets.token_hex(4)
    pg_url = make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_admin(postgres_url, f'CREATE DATABASE "{name}"'))
    try:
        upgrade(pg_url)
        report["postgresql"] = asyncio.run(_measure(pg_url, "bench-postgresql", workdir, count, concurrency))
    finally:
        asyncio.run(_admin(postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        shutil.rmtree(workdir, ignore_errors=True)
    text = json.dumps(report, indent=2)
    typer.echo(text)
    if json_out is not None:
        json_out.write_text(text + "\n")


async def _admin(url: str, statement: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(sa.text(statement))
    await engine.dispose()


if __name__ == "__main__":
    typer.run(main)
