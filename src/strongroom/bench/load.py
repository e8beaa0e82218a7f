"""The load generator: runs in its own process so that it never competes with the server's event
loop, and reports one sample per request (finish time, latency, outcome)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class LoadSpec:
    base_url: str
    secret_key: str
    payment_methods: tuple[str, ...]
    clients: int
    warmup_s: float
    duration_s: float
    # Open loop: requests started at this rate whatever the answers (surge); 0 = closed loop.
    rate_per_s: float = 0.0
    request_timeout_s: float = 30.0


@dataclass(frozen=True)
class Sample:
    finished_s: float  # since the end of the warm-up
    latency_ms: float
    outcome: str  # "ok", "http_429", "http_503", "http_402", "timeout", "error:<kind>"
    retry_after: bool


def _outcome(response: httpx.Response) -> str:
    return "ok" if response.status_code == 200 else f"http_{response.status_code}"


async def _one(client: httpx.AsyncClient, spec: LoadSpec, n: int, t0: float) -> Sample:
    data = {
        "amount": "2000",
        "currency": "usd",
        "payment_method": spec.payment_methods[n % len(spec.payment_methods)],
        "confirm": "true",
    }
    started = time.perf_counter()
    try:
        response = await client.post("/v1/payment_intents", data=data, headers={"Idempotency-Key": str(uuid.uuid4())})
        outcome, retry_after = _outcome(response), "retry-after" in response.headers
    except httpx.TimeoutException:
        outcome, retry_after = "timeout", False
    except httpx.HTTPError as exc:
        outcome, retry_after = f"error:{type(exc).__name__}", False
    ended = time.perf_counter()
    return Sample(ended - t0, (ended - started) * 1000, outcome, retry_after)


async def _closed_loop(spec: LoadSpec) -> list[Sample]:
    limits = httpx.Limits(max_connections=spec.clients, max_keepalive_connections=spec.clients)
    headers = {"Authorization": f"Bearer {spec.secret_key}"}
    timeout = httpx.Timeout(spec.request_timeout_s)
    samples: list[Sample] = []
    t0 = time.perf_counter() + spec.warmup_s
    deadline = t0 + spec.duration_s
    async with httpx.AsyncClient(base_url=spec.base_url, headers=headers, limits=limits, timeout=timeout) as client:

        async def worker(w: int) -> None:
            n = w
            while time.perf_counter() < deadline:
                sample = await _one(client, spec, n, t0)
                if sample.finished_s >= 0:
                    samples.append(sample)
                n += spec.clients

        await asyncio.gather(*(worker(w) for w in range(spec.clients)))
    return samples


async def _open_loop(spec: LoadSpec) -> list[Sample]:
    limits = httpx.Limits(max_connections=spec.clients, max_keepalive_connections=spec.clients)
    headers = {"Authorization": f"Bearer {spec.secret_key}"}
    samples: list[Sample] = []
    t0 = time.perf_counter()
    total = int(spec.rate_per_s * spec.duration_s)
    async with httpx.AsyncClient(
        base_url=spec.base_url, headers=headers, limits=limits, timeout=httpx.Timeout(spec.request_timeout_s)
    ) as client:
        tasks = []
        for n in range(total):
            delay = t0 + n / spec.rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(client, spec, n, t0)))
        samples = list(await asyncio.gather(*tasks))
    return samples


def run(spec: LoadSpec) -> list[Sample]:
    """Entry point of the load-generator process."""
    return asyncio.run(_open_loop(spec) if spec.rate_per_s else _closed_loop(spec))
