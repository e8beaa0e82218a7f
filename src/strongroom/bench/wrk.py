"""The wrk load generator (C, event-driven): it costs far less CPU than an httpx client on the
same 2 cores, so more of the machine is left to the server, as pgbench's C client leaves it to
PostgreSQL. Each request carries a unique Idempotency-Key; wrk's `done` hook prints the figures."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

_SCRIPT = """
local counter = 0
local methods = {%(methods)s}
CDF_POINTS = {%(cdf)s}
local run = "%(run)s"
local threads = {}

function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end

function request()
  counter = counter + 1
  local body = "amount=2000&currency=usd&confirm=true&payment_method=" .. methods[(counter %% #methods) + 1]
  local headers = {
    ["Authorization"] = "Bearer %(key)s",
    ["Content-Type"] = "application/x-www-form-urlencoded",
    -- A letter first: a run id of hex digits only, with the thread and counter, can form a
    -- Luhn-valid card number, which the server rightly refuses as a key (seen: 34 refusals in a run).
    ["Idempotency-Key"] = "pay-" .. run .. "-" .. tid .. "-" .. counter,
  }
  return wrk.format("POST", "/v1/payment_intents", headers, body)
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "non_2xx": %%d, "timeouts": %%d, "connect": %%d, "read": %%d,'
    .. ' "write": %%d, "p50_us": %%d, "p95_us": %%d, "p99_us": %%d, "max_us": %%d}\\n',
    summary.requests, summary.duration, errors.status, errors.timeout, errors.connect, errors.read, errors.write,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
  -- The latency distribution, as (percentile, microseconds) points, for the plot.
  local points = {}
  for _, p in ipairs(CDF_POINTS) do
    -- wrk answers 0 for the 100th percentile: its maximum instead.
    local us = p >= 100 and latency.max or latency:percentile(p)
    table.insert(points, string.format("[%%g, %%d]", p, us))
  end
  io.write("WRKCDF [" .. table.concat(points, ", ") .. "]\\n")
end
"""
# 1st to 99th percentile, then the tail more finely.
_CDF_POINTS = [*range(1, 100), 99.5, 99.9, 99.99, 100]


THREADS = 2  # wrk's threads: the cores it can use at most


def available() -> bool:
    return shutil.which("wrk") is not None


def run(
    base_url: str, key: str, methods: tuple[str, ...], clients: int, duration_s: float, run_id: str
) -> dict[str, Any]:
    script = _SCRIPT % {
        "methods": ", ".join(f'"{m}"' for m in methods),
        "key": key,
        "run": run_id,
        "cdf": ", ".join(str(p) for p in _CDF_POINTS),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "payments.lua"
        path.write_text(script)
        cmd = [
            shutil.which("wrk") or "wrk",
            f"-t{THREADS}",
            f"-c{clients}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "30s",
            "-s",
            str(path),
            base_url,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=duration_s + 120).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    figures: dict[str, Any] = json.loads(line.removeprefix("WRKJSON "))
    cdf = next((ln for ln in out.splitlines() if ln.startswith("WRKCDF ")), None)
    figures["latency_cdf_us"] = json.loads(cdf.removeprefix("WRKCDF ")) if cdf else []
    return figures


def summarize(figures: dict[str, Any]) -> dict[str, Any]:
    seconds = figures["duration_us"] / 1e6
    ok = figures["requests"] - figures["non_2xx"]
    errors = {name: figures[name] for name in ("non_2xx", "timeouts", "connect", "read", "write") if figures[name]}
    return {
        "requests": figures["requests"],
        "succeeded": ok,
        "payments_per_s": round(ok / seconds, 1) if seconds else 0.0,
        "latency_ms": {q: round(figures[f"{q}_us"] / 1000, 2) for q in ("p50", "p95", "p99", "max")},
        "errors": errors,
        "generator": "wrk",
    }
