"""Orchestrates one benchmark run on PostgreSQL: a fresh database, the server with N workers, a
merchant, the load generator in its own process, pgbench TPC-B against the same server at the
same client count, and the correctness checks (charges at the processor == succeeded payments,
no payment authorized twice)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from strongroom.bench import cpu, generator, load, report, wrk
from strongroom.ledger import service as ledger_service
from strongroom.payments.sandbox_aliases import ALIASES

_CLI = [sys.executable, "-c", "from strongroom.cli import main; main()"]


@dataclass(frozen=True)
class BenchConfig:
    database_url: str
    clients: int = 32
    duration_s: float = 20.0
    warmup_s: float = 5.0
    workers: int = 2
    payment_methods: int = 64
    pgbench: bool = True
    generator: str = "auto"  # "wrk" when on PATH, else "python" (see generator.resolve)
    generator_processes: int = 0  # the Python generator's; 0: generator.default_processes
    seed_payments: int = 500  # made before ANALYZE and the measured phases (see _seed)
    data_dir: Path = Path("benchmarks/out")


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    async with engine.connect() as conn:
        await conn.execute(sa.text(statement))
    await engine.dispose()


@contextlib.contextmanager
def fresh_database(admin_url: str, prefix: str) -> Iterator[str]:
    name = f"{prefix}_{secrets.token_hex(4)}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def server(env: dict[str, str], workers: int, data_dir: Path) -> Iterator[tuple[str, int]]:
    """The server's URL and its process id, once it answers /readyz."""
    port = _free_port()
    log = (data_dir / "server.log").open("wb")
    cmd = [*_CLI, "serve", "--port", str(port), "--workers", str(workers), "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {data_dir / 'server.log'}")
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready in 60 s")
        yield url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _cli(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([*_CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def _payment_methods(url: str, key: str, count: int) -> tuple[str, ...]:
    ids = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        for _ in range(count):
            data = {
                "type": "card",
                "card[number]": ALIASES["pm_card_visa"],
                "card[exp_month]": "12",
                "card[exp_year]": "2040",
            }
            response = client.post("/v1/payment_methods", data=data)
            response.raise_for_status()
            ids.append(response.json()["id"])
    return tuple(ids)


async def _seed_payments(url: str, key: str, methods: tuple[str, ...], count: int) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:

        async def pay(n: int) -> None:
            data = {"amount": "2000", "currency": "usd", "confirm": "true", "payment_method": methods[n % len(methods)]}
            response = await client.post("/v1/payment_intents", data=data, headers={"Idempotency-Key": f"seed-{n}"})
            response.raise_for_status()

        for start in range(0, count, 16):
            await asyncio.gather(*(pay(n) for n in range(start, min(count, start + 16))))


def _seed(prep: Prepared, count: int) -> None:
    """Payments made before measuring, then ANALYZE, as `pgbench -i` loads and vacuums its tables
    before its run. On never-analyzed tables the planner's generic plans, cached per connection
    for its life, could pick the paging index for a lookup by primary key and read the merchant's
    whole history per payment (seen: 440 index tuples read per intent UPDATE, 2.4 M in a 10 s
    run, on a fresh database). A deployment has statistics; so must the benchmark."""
    if count:
        asyncio.run(_seed_payments(prep.base_url, prep.merchant["secret_key"], prep.methods, count))
    asyncio.run(_admin(prep.url, "ANALYZE"))


def pgbench_tps(admin_url: str, clients: int, duration_s: float) -> float:
    """TPC-B-like built-in script, same server, same client count, in a database of its own."""
    with fresh_database(admin_url, "strongroom_pgbench") as url:
        parsed = make_url(url)
        conn = ["-h", parsed.host or "127.0.0.1", "-p", str(parsed.port or 5432), "-U", parsed.username or "postgres"]
        pgbench = shutil.which("pgbench") or "pgbench"
        subprocess.run([pgbench, "-i", "-q", "-s", "10", *conn, parsed.database or ""], check=True, capture_output=True)
        threads = str(min(clients, 2))
        out = subprocess.run(
            [
                pgbench,
                "-c",
                str(clients),
                "-j",
                threads,
                "-T",
                str(int(duration_s)),
                "-M",
                "prepared",
                *conn,
                parsed.database or "",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    match = re.search(r"tps = ([0-9.]+)", out)
    if match is None:
        raise RuntimeError(f"pgbench printed no tps: {out}")
    return float(match.group(1))


async def _correctness(url: str, merchant_id: str) -> dict[str, int]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        succeeded = await conn.scalar(
            sa.text("SELECT count(*) FROM payment_intents WHERE merchant_id = :m AND status = 'succeeded'"),
            {"m": merchant_id},
        )
        charged = await conn.scalar(
            sa.text("SELECT count(*) FROM sandbox_charges WHERE merchant_id = :m"), {"m": merchant_id}
        )
        doubled = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM (SELECT payment_intent_id FROM charges WHERE merchant_id = :m "
                "AND status = 'succeeded' GROUP BY payment_intent_id HAVING count(*) > 1) d"
            ),
            {"m": merchant_id},
        )
        # Issue 5 in every run: the trial balance holds, and the ledger's captures are exactly the
        # succeeded payments (one capture posting each).
        trial = await ledger_service.check(conn, merchant_id=merchant_id)
        captures = await conn.scalar(
            sa.text("SELECT count(*) FROM ledger_transactions WHERE merchant_id = :m AND kind = 'capture'"),
            {"m": merchant_id},
        )
    await engine.dispose()
    return {
        "succeeded_payments": int(succeeded or 0),
        "processor_charges": int(charged or 0),
        "double_charges": int(doubled or 0),
        "ledger_captures": int(captures or 0),
        "trial_balance_problems": len(trial.problems),
    }


def _matches(checks: dict[str, int]) -> bool:
    """Processor charges == succeeded payments == ledger captures, and the trial balance holds."""
    succeeded = checks.get("succeeded_payments")
    return (
        succeeded == checks.get("processor_charges") == checks.get("ledger_captures")
        and checks.get("trial_balance_problems") == 0
    )


@dataclass(frozen=True)
class Phase:
    """One load phase against the same server: closed loop (rate 0) or open loop at `rate_per_s`."""

    duration_s: float
    clients: int
    rate_per_s: float = 0.0
    warmup_s: float = 0.0


def run(config: BenchConfig, *, rate_per_s: float = 0.0) -> dict[str, Any]:
    """The standard measurement: one closed-loop phase after a warm-up (or an open loop at
    `rate_per_s`, always the Python generator's: wrk has no fixed-rate mode)."""
    if generator.resolve(config.generator) == "wrk" and not rate_per_s:
        return _run_wrk(config)
    phase = Phase(config.duration_s, config.clients, rate_per_s, config.warmup_s)
    result = run_phases(config, [phase])
    one: generator.LoadRun = result.pop("_phases")[0]
    result.update(report.summarize(one.samples, config.duration_s))
    result["config"] = {"clients": config.clients, "workers": config.workers, "duration_s": config.duration_s}
    result["cpu_ms_per_payment"] = one.used
    result.update(generator.assess("python", one.processes, one.cpu_s, config.duration_s, one.used))
    result["generator_cpu"]["processes"] = one.processes
    result["_samples"] = one.samples
    return result


def _processes(config: BenchConfig) -> int:
    return config.generator_processes or generator.default_processes(config.clients)


@dataclass
class Prepared:
    url: str
    merchant: dict[str, Any]
    base_url: str = ""
    methods: tuple[str, ...] = ()
    checks: dict[str, int] | None = None
    server_pid: int = 0


@contextlib.contextmanager
def _prepared(config: BenchConfig) -> Iterator[Prepared]:
    """A fresh database, a merchant and a running server with payment methods. The correctness
    checks run after the server has shut down gracefully (in-flight requests finished)."""
    config.data_dir.mkdir(parents=True, exist_ok=True)
    with fresh_database(config.database_url, "strongroom_bench") as url:
        data_dir = config.data_dir / f"run_{secrets.token_hex(3)}"
        data_dir.mkdir(parents=True)
        env = {**os.environ, "STRONGROOM_DATABASE_URL": url, "STRONGROOM_LOG_LEVEL": "warning"}
        _cli(["migrate", "--data-dir", str(data_dir)], env)
        merchant = json.loads(_cli(["merchants", "create", "Bench", "--json", "--data-dir", str(data_dir)], env))
        prepared = Prepared(url, merchant)
        with server(env, config.workers, data_dir) as (base_url, server_pid):
            prepared.base_url, prepared.server_pid = base_url, server_pid
            prepared.methods = _payment_methods(base_url, merchant["secret_key"], config.payment_methods)
            _seed(prepared, config.seed_payments)
            yield prepared
        prepared.checks = asyncio.run(_correctness(url, merchant["id"]))


def _run_wrk(config: BenchConfig) -> dict[str, Any]:
    with _prepared(config) as prep:
        key = prep.merchant["secret_key"]
        if config.warmup_s:
            wrk.run(prep.base_url, key, prep.methods, config.clients, config.warmup_s, "w" + secrets.token_hex(4))
        started, before = time.time(), cpu.snapshot(prep.server_pid) if cpu.available() else None
        generator_before = generator.children_cpu_s()
        figures = wrk.run(prep.base_url, key, prep.methods, config.clients, config.duration_s, secrets.token_hex(6))
        generator_s = generator.children_cpu_s() - generator_before
        succeeded = figures["requests"] - figures["non_2xx"]
        used = cpu.per_payment(before, cpu.snapshot(prep.server_pid), succeeded) if before else {}
        timeline = asyncio.run(_per_second(prep.url, prep.merchant["id"], started, time.time()))
    checks = prep.checks or {}
    result = {**wrk.summarize(figures), **checks}
    result["processor_matches_ledger"] = _matches(checks)
    result["config"] = {"clients": config.clients, "workers": config.workers, "duration_s": config.duration_s}
    result["cpu_ms_per_payment"] = used
    result.update(generator.assess("wrk", wrk.THREADS, generator_s, figures["duration_us"] / 1e6, used))
    result["_samples"] = []
    # For the plot: wrk reports no per-request samples, so throughput over time is read from the
    # database afterwards (payments by the second they succeeded) and latency as wrk's percentiles.
    result["_wrk_plot"] = {"per_second": timeline, "latency_cdf_us": figures["latency_cdf_us"]}
    return result


async def _per_second(url: str, merchant_id: str, start: float, end: float) -> list[int]:
    """Payments that succeeded in each whole second of [start, end) (epoch seconds), by their
    intents' last update: read after the run, so measuring it costs the run nothing. A last,
    partial second is left out (plotted as a rate it would look like a collapse)."""
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(
                    "SELECT floor(extract(epoch FROM updated) - :start)::int AS second, count(*) AS n "
                    "FROM payment_intents WHERE merchant_id = :m AND status = 'succeeded' "
                    "AND updated >= to_timestamp(:start) AND updated < to_timestamp(:end) GROUP BY 1"
                ),
                {"m": merchant_id, "start": start, "end": end},
            )
        ).all()
    await engine.dispose()
    series = [0] * max(1, math.floor(end - start))
    for second, n in rows:
        if 0 <= second < len(series):
            series[second] = int(n)
    return series


def run_phases(config: BenchConfig, phases: list[Phase]) -> dict[str, Any]:
    """Phases run one after another against one server and database; correctness checked at the end."""
    results = []
    with _prepared(config) as prep:
        key = prep.merchant["secret_key"]
        for ph in phases:
            spec = load.LoadSpec(
                prep.base_url, key, prep.methods, ph.clients, ph.warmup_s, ph.duration_s, ph.rate_per_s
            )
            results.append(generator.run_python(spec, _processes(config), prep.server_pid))
    checks = prep.checks or {}
    return {
        **checks,
        "processor_matches_ledger": _matches(checks),
        "_phases": results,
    }


def surge(
    config: BenchConfig, sustainable_per_s: float, *, factor: float = 10.0, surge_s: float = 30.0
) -> dict[str, Any]:
    """Open loop at `factor` x the sustainable rate, then a closed-loop phase to show recovery.
    With the wrk generator, the closed loops before and after are wrk's (the Python closed loop
    tops out below wrk's), the surge the Python open loop."""
    if generator.resolve(config.generator) == "wrk":
        return _surge_wrk(config, sustainable_per_s, factor=factor, surge_s=surge_s)
    phases = [
        Phase(config.duration_s / 2, config.clients, warmup_s=config.warmup_s),
        Phase(surge_s, 512, rate_per_s=sustainable_per_s * factor),
        Phase(config.duration_s / 2, config.clients),
    ]
    result = run_phases(config, phases)
    before, during, after = (one.samples for one in result.pop("_phases"))
    result.update(
        {
            "offered_per_s": round(sustainable_per_s * factor, 1),
            "before": report.summarize(before, config.duration_s / 2),
            "surge": _surge_figures(during, surge_s),
            "after": report.summarize(after, config.duration_s / 2),
        }
    )
    return result


def _surge_figures(during: list[load.Sample], surge_s: float) -> dict[str, Any]:
    last = max((s.finished_s for s in during), default=0.0)
    return {
        **report.summarize(during, surge_s),
        "accepted": sum(1 for s in during if s.outcome == "ok"),
        "shed": sum(1 for s in during if s.outcome in ("http_503", "http_429")),
        "not_sent_generator_limit": sum(1 for s in during if s.outcome == "not_sent"),
        "drain_s": round(max(0.0, last - surge_s), 2),
    }


def _surge_wrk(config: BenchConfig, sustainable_per_s: float, *, factor: float, surge_s: float) -> dict[str, Any]:
    rate = sustainable_per_s * factor
    with _prepared(config) as prep:
        key, half = prep.merchant["secret_key"], config.duration_s / 2
        wrk.run(prep.base_url, key, prep.methods, config.clients, config.warmup_s, "w" + secrets.token_hex(4))
        before = wrk.run(prep.base_url, key, prep.methods, config.clients, half, "b" + secrets.token_hex(4))
        spec = load.LoadSpec(prep.base_url, key, prep.methods, 512, 0.0, surge_s, rate)
        during = generator.run_python(spec, 1).samples
        after = wrk.run(prep.base_url, key, prep.methods, config.clients, half, "a" + secrets.token_hex(4))
    checks = prep.checks or {}
    return {
        **checks,
        "processor_matches_ledger": _matches(checks),
        "offered_per_s": round(rate, 1),
        "before": wrk.summarize(before),
        "surge": _surge_figures(during, surge_s),
        "after": wrk.summarize(after),
    }
