"""Which load generator a run uses, how the Python one is spread over processes, and whether the
generator rather than the server set the rate.

On the machine it measures, a generator competes with the server for CPU: every millisecond it
spends is one the server does not get, and a generator that uses all the cores it can use caps the
rate itself. So `auto` picks the one that costs least (wrk, a C client, when it is on PATH), and
every run reports the generator's CPU and warns when the generator, not the server, set the rate.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import shutil
import time
from dataclasses import dataclass, replace
from threading import Barrier
from typing import Any

from strongroom.bench import cpu, load

NAMES = ("auto", "wrk", "python")
# The generator's former name, kept so that existing scripts still run (it is the Python generator).
_ALIASES = {"httpx": "python"}

# A generator at this fraction of the cores it can use (wrk's threads, the Python generator's
# processes) is CPU-bound: the rate it reports is its own ceiling.
SATURATED_FRACTION = 0.85
# On a machine with less idle time than IDLE_MIN, CPU the generator takes is CPU the server and
# PostgreSQL lack; above SHARE_MAX of the run's own CPU the rate understates the server by about
# that much.
SHARE_MAX = 0.15
IDLE_MIN = 0.10
# Processes have to be started, import and connect before the measured window opens.
_START_TIMEOUT_S = 120.0


class GeneratorUnavailable(RuntimeError):
    """The generator asked for is not installed."""


def resolve(name: str, path: str | None = None) -> str:
    """`wrk` or `python`. `auto` is wrk when `wrk` is on PATH (or `path`), else the Python
    generator; `wrk` asked for by name and not found is an error, never a silent substitute."""
    name = _ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unknown generator {name!r}: one of {', '.join(NAMES)}")
    found = shutil.which("wrk", path=path) is not None
    if name == "wrk" and not found:
        raise GeneratorUnavailable("wrk is not on PATH (scripts/system-deps installs it)")
    if name == "auto":
        return "wrk" if found else "python"
    return name


def default_processes(clients: int) -> int:
    """A quarter of the cores, at least one: the Python generator spends a small fraction of the
    server's CPU on a request, so this leaves it headroom without taking the server's cores."""
    return max(1, min(clients, (os.cpu_count() or 1) // 4))


def children_cpu_s() -> float:
    """CPU of this process's waited-for children (wrk runs as one)."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


@dataclass(frozen=True)
class LoadRun:
    samples: list[load.Sample]
    processes: int
    cpu_s: float  # the generator's processes, in the measured window
    used: dict[str, float]  # cpu_ms_per_payment; empty without /proc


def shares(spec: load.LoadSpec, processes: int) -> list[load.LoadSpec]:
    """The clients dealt out to the processes (an open loop keeps one process: one schedule)."""
    if spec.rate_per_s or processes == 1:
        return [spec]
    sizes = [spec.clients // processes + (1 if i < spec.clients % processes else 0) for i in range(processes)]
    return [replace(spec, clients=n, first_n=sum(sizes[:i])) for i, n in enumerate(sizes) if n]


def run_python(spec: load.LoadSpec, processes: int, server_pid: int = 0) -> LoadRun:
    """The Python generator in `processes` separate processes (spawned: no state shared with this
    one), released together once all have started; this process reads /proc at the edges of the
    measured window while they run."""
    split = shares(spec, processes)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(len(split) + 1)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=len(split), mp_context=ctx, initializer=load.init, initargs=(ready, _START_TIMEOUT_S)
    ) as pool:
        futures = [pool.submit(load.run, share) for share in split]
        _wait_ready(ready, futures)
        measure = server_pid and cpu.available()
        time.sleep(spec.warmup_s)
        before = cpu.snapshot(server_pid) if measure else None
        time.sleep(spec.duration_s)
        after = cpu.snapshot(server_pid) if measure else None
        parts = [f.result(timeout=spec.duration_s + 300) for f in futures]
    samples = [s for part in parts for s in part.samples]
    cpu_s = sum(part.cpu_s for part in parts)
    ok = sum(1 for s in samples if s.outcome == "ok" and s.finished_s <= spec.duration_s)
    used = cpu.per_payment(before, after, ok, generator_s=cpu_s) if before and after else {}
    return LoadRun(samples, len(split), cpu_s, used)


def _wait_ready(ready: Barrier, futures: list[concurrent.futures.Future[load.LoadResult]]) -> None:
    """Join the barrier once every process waits at it; a process that failed while starting
    raises its error here at once rather than after the barrier's timeout."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while ready.n_waiting < len(futures) and time.monotonic() < deadline:
        for failed in (f for f in futures if f.done()):
            failed.result()
        time.sleep(0.02)
    ready.wait(timeout=max(0.1, deadline - time.monotonic()))


def assess(name: str, capacity: int, cpu_s: float, window_s: float, used: dict[str, float]) -> dict[str, Any]:
    """The generator's figures for a result, and a warning for each sign that it limited the rate:
    it used nearly all the cores it can use, or it took a large share of a saturated machine."""
    capacity = max(1, min(capacity, os.cpu_count() or 1))
    cores = cpu_s / window_s if window_s > 0 else 0.0
    figures: dict[str, Any] = {"cores": round(cores, 3), "cores_usable": capacity}
    warnings = []
    if cores >= SATURATED_FRACTION * capacity:
        warnings.append(
            f"the {name} generator used {cores:.2f} of the {capacity} cores it can use: it, not the server, "
            "limited the rate (use wrk, or more generator processes)"
        )
    run_ms = used.get("server", 0.0) + used.get("postgres", 0.0) + used.get("generator", 0.0)
    machine_ms = used.get("machine_busy", 0.0) + used.get("machine_idle", 0.0)
    if run_ms > 0 and machine_ms > 0:
        share, idle = used["generator"] / run_ms, used["machine_idle"] / machine_ms
        figures.update({"share_of_run": round(share, 3), "share_of_machine": round(used["generator"] / machine_ms, 3)})
        if share > SHARE_MAX and idle < IDLE_MIN:
            warnings.append(
                f"the {name} generator took {share:.0%} of the run's CPU on a machine with {idle:.0%} idle: "
                "the server had that much less, so the rate understates it (use wrk, or another machine)"
            )
    return {"generator": name, "generator_cpu": figures, "warnings": warnings}
