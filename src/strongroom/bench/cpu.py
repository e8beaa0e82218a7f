"""CPU time per payment, read from /proc (Linux): the server's processes (the supervisor and its
workers), PostgreSQL's when it runs on this machine, the load generator's, and the machine's busy
and idle time. Payments a second on a shared 2-core machine tell how fast a run was; these tell
where each payment's time went, the server's share and PostgreSQL's apart, which is what a change
to one side moves."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class Snapshot:
    server_s: float  # the server's process tree
    postgres_s: dict[int, float]  # each PostgreSQL process's CPU, by pid
    generator_s: float  # this process's waited-for children (wrk)
    busy_s: float  # the machine, all CPUs
    idle_s: float  # idle and waiting for I/O


def _ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _cpu(pid: int) -> float:
    """User + system CPU seconds of `pid`; 0 if it is gone."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _ticks()


def _parents() -> dict[int, int]:
    parents = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
    return parents


def _tree(root: int, parents: dict[int, int]) -> set[int]:
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        grew = bool(more)
        tree |= more
    return tree


def _named(name: str, pids: dict[int, int]) -> list[int]:
    found = []
    for pid in pids:
        try:
            if (_PROC / str(pid) / "comm").read_text().strip() == name:
                found.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def available() -> bool:
    return (_PROC / "stat").exists()


def snapshot(server_pid: int) -> Snapshot:
    parents = _parents()
    fields = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Snapshot(
        server_s=sum(_cpu(pid) for pid in _tree(server_pid, parents)),
        postgres_s={pid: _cpu(pid) for pid in _named("postgres", parents)},
        generator_s=children.ru_utime + children.ru_stime,
        busy_s=(sum(fields) - idle) / _ticks(),
        idle_s=idle / _ticks(),
    )


def per_payment(before: Snapshot, after: Snapshot, payments: int) -> dict[str, float]:
    """Milliseconds of CPU a payment between two snapshots. PostgreSQL's counts the processes
    alive at the second (a process started in between counts whole; one that ended in between,
    such as a short autovacuum worker, is missed: its time still shows in the machine's)."""
    if payments <= 0:
        return {}
    postgres = sum(cpu - before.postgres_s.get(pid, 0.0) for pid, cpu in after.postgres_s.items())

    def ms(seconds: float) -> float:
        return round(1000 * seconds / payments, 3)

    return {
        "server": ms(after.server_s - before.server_s),
        "postgres": ms(postgres),
        "generator": ms(after.generator_s - before.generator_s),
        "machine_busy": ms(after.busy_s - before.busy_s),
        "machine_idle": ms(after.idle_s - before.idle_s),
    }
