"""The Python load generator: runs in processes of its own so that it never competes with the
server's event loop, and reports one sample per request (finish time, latency, outcome) and the
CPU it spent in the measured window.

Requests go over raw asyncio streams with keep-alive, not through a general HTTP client: this
generator shares the machine with the server, and every millisecond of its CPU is one the server
does not get (a general client such as httpx costs several times more a request, and queues
requests inside its connection pool)."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from dataclasses import dataclass
from threading import Barrier
from urllib.parse import urlsplit

import uvloop


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
    first_n: int = 0  # this process's first request number (payment methods are taken in turn)


@dataclass(frozen=True)
class Sample:
    finished_s: float  # since the end of the warm-up
    latency_ms: float
    outcome: str  # "ok", "http_429", "http_503", "http_402", "timeout", "error:<kind>"
    retry_after: bool


@dataclass(frozen=True)
class LoadResult:
    samples: list[Sample]
    cpu_s: float  # this process's CPU (user + system) in the measured window


async def _closed_loop(spec: LoadSpec, t0: float) -> list[Sample]:
    """Each client sends its next request when the last one is answered, until the deadline."""
    http = _Connections(spec.base_url, spec.secret_key)
    samples: list[Sample] = []
    deadline = t0 + spec.duration_s

    async def worker(w: int) -> None:
        n = spec.first_n + w
        while time.perf_counter() < deadline:
            sample = await _one_raw(http, spec, n, t0)
            if sample.finished_s >= 0:
                samples.append(sample)
            n += spec.clients

    try:
        await asyncio.gather(*(worker(w) for w in range(spec.clients)))
    finally:
        http.close()
    return samples


OPEN_LOOP_OUTSTANDING_MAX = 1024


class _Connections:
    """A minimal HTTP/1.1 client over asyncio streams: keep-alive connections taken from an idle
    list (a new one when none is idle), one request at a time on each."""

    def __init__(self, base_url: str, secret_key: str) -> None:
        url = urlsplit(base_url)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 80
        self._head = (
            f"Host: {self._host}:{self._port}\r\nAuthorization: Bearer {secret_key}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
        ).encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes, key: str) -> tuple[int, bool]:
        """(status, whether Retry-After was sent). Raises OSError or IncompleteReadError."""
        reader, writer = self._idle.pop() if self._idle else await asyncio.open_connection(self._host, self._port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\n".encode()
                + self._head
                + f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            status = int((await reader.readline()).split()[1])
            length, retry_after, keep = 0, False, True
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"retry-after":
                    retry_after = True
                elif name == b"connection" and value.strip().lower() == b"close":
                    keep = False
            await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if keep:
            self._idle.append((reader, writer))
        else:
            writer.close()
        return status, retry_after

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()


async def _one_raw(http: _Connections, spec: LoadSpec, n: int, t0: float) -> Sample:
    method = spec.payment_methods[n % len(spec.payment_methods)]
    body = f"amount=2000&currency=usd&confirm=true&payment_method={method}".encode()
    started = time.perf_counter()
    try:
        async with asyncio.timeout(spec.request_timeout_s):
            status, retry_after = await http.post("/v1/payment_intents", body, str(uuid.uuid4()))
        outcome = "ok" if status == 200 else f"http_{status}"
    except TimeoutError:
        outcome, retry_after = "timeout", False
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        outcome, retry_after = f"error:{type(exc).__name__}", False
    ended = time.perf_counter()
    return Sample(ended - t0, (ended - started) * 1000, outcome, retry_after)


async def _open_loop(spec: LoadSpec, t0: float) -> list[Sample]:
    """Arrivals on a fixed schedule whatever the answers. At most OPEN_LOOP_OUTSTANDING_MAX requests
    are in flight; an arrival beyond that is recorded as `not_sent` (the generator's limit, reported
    separately, never counted as the server's)."""
    http = _Connections(spec.base_url, spec.secret_key)
    samples: list[Sample] = []
    outstanding = 0
    start = t0 - spec.warmup_s
    # Arrivals during the warm-up open the connections and are not recorded.
    warmup_arrivals = int(spec.rate_per_s * spec.warmup_s)

    async def send(n: int) -> None:
        nonlocal outstanding
        try:
            sample = await _one_raw(http, spec, n, t0)
            if n >= warmup_arrivals:
                samples.append(sample)
        finally:
            outstanding -= 1

    tasks = []
    try:
        for n in range(warmup_arrivals + int(spec.rate_per_s * spec.duration_s)):
            delay = start + n / spec.rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if outstanding >= OPEN_LOOP_OUTSTANDING_MAX:
                if n >= warmup_arrivals:
                    samples.append(Sample(time.perf_counter() - t0, 0.0, "not_sent", False))
                continue
            outstanding += 1
            tasks.append(asyncio.create_task(send(n)))
        await asyncio.gather(*tasks)
    finally:
        http.close()
    return samples


# The generator's own collector pauses every request in flight, and the pause would be counted as
# the server's latency: full collections over the growing list of samples took tens of
# milliseconds. So, as the server does (app.py), objects alive at start are frozen and collections
# are rare (figures in docs/performance.md).
_GC_THRESHOLDS = (20_000, 50, 100)


# Set once per process by `init` (a process pool's initializer): the barrier and its timeout.
_ready: list[tuple[Barrier, float]] = []


def init(ready: Barrier, timeout_s: float) -> None:
    """Process initializer: `run` waits at `ready` so that every generator process starts its
    warm-up together, and the parent knows when the measured window opens."""
    _ready[:] = [(ready, timeout_s)]


async def _window_cpu_s(t0: float, duration_s: float) -> float:
    await asyncio.sleep(max(0.0, t0 - time.perf_counter()))
    start = time.process_time()
    await asyncio.sleep(max(0.0, t0 + duration_s - time.perf_counter()))
    return time.process_time() - start


async def _main(spec: LoadSpec) -> LoadResult:
    t0 = time.perf_counter() + spec.warmup_s
    window = asyncio.create_task(_window_cpu_s(t0, spec.duration_s))
    samples = await (_open_loop(spec, t0) if spec.rate_per_s else _closed_loop(spec, t0))
    return LoadResult(samples, await window)


def run(spec: LoadSpec) -> LoadResult:
    """Entry point of a load-generator process. On uvloop, as the server: asyncio's own loop costs
    the generator noticeably more CPU per request, CPU the server then lacks."""
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    for barrier, timeout_s in _ready:
        barrier.wait(timeout=timeout_s)
    return uvloop.run(_main(spec))
