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


OPEN_LOOP_CLIENTS = 16  # separate pools: httpcore's queue handling is quadratic in queued requests
OPEN_LOOP_OUTSTANDING_MAX = 1024


async def _open_loop(spec: LoadSpec) -> list[Sample]:
    """Arrivals on a fixed schedule whatever the answers. At most OPEN_LOOP_OUTSTANDING_MAX requests
    are in flight; an arrival beyond that is recorded as `not_sent` (the generator's limit, reported
    separately, never counted as the server's)."""
    headers = {"Authorization": f"Bearer {spec.secret_key}"}
    per_client = max(1, spec.clients // OPEN_LOOP_CLIENTS)
    limits = httpx.Limits(max_connections=per_client, max_keepalive_connections=per_client)
    clients = [
        httpx.AsyncClient(
            base_url=spec.base_url, headers=headers, limits=limits, timeout=httpx.Timeout(spec.request_timeout_s)
        )
        for _ in range(OPEN_LOOP_CLIENTS)
    ]
    samples: list[Sample] = []
    outstanding = 0
    t0 = time.perf_counter()

    async def send(n: int) -> None:
        nonlocal outstanding
        try:
            samples.append(await _one(clients[n % OPEN_LOOP_CLIENTS], spec, n, t0))
        finally:
            outstanding -= 1

    tasks = []
    try:
        for n in range(int(spec.rate_per_s * spec.duration_s)):
            delay = t0 + n / spec.rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= OPEN_LOOP_OUTSTANDING_MAX:
                samples.append(Sample(time.perf_counter() - t0, 0.0, "not_sent", False))
                continue
            outstanding += 1
            tasks.append(asyncio.create_task(send(n)))
        await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.aclose()
    return samples


def run(spec: LoadSpec) -> list[Sample]:
    """Entry point of the load-generator process."""
    return asyncio.run(_open_loop(spec) if spec.rate_per_s else _closed_loop(spec))
