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


@dataclass(frozen=True)
class _Process:
    name: str  # as /proc/<pid>/comm has it
    parent: int
    cpu_s: float  # user + system


def _processes() -> dict[int, _Process]:
    """Every process now, from one read of its /proc/<pid>/stat (name, parent and CPU)."""
    found = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        name, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 1 :].split()
        found[int(entry.name)] = _Process(name, int(rest[1]), (int(rest[11]) + int(rest[12])) / _ticks())
    return found


def _tree(root: int, processes: dict[int, _Process]) -> set[int]:
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, p in processes.items() if p.parent in tree} - tree
        grew = bool(more)
        tree |= more
    return tree


def available() -> bool:
    return (_PROC / "stat").exists()


def snapshot(server_pid: int) -> Snapshot:
    processes = _processes()
    fields = [int(v) for v in (_PROC / "stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Snapshot(
        server_s=sum(processes[pid].cpu_s for pid in _tree(server_pid, processes) if pid in processes),
        postgres_s={pid: p.cpu_s for pid, p in processes.items() if p.name == "postgres"},
        generator_s=children.ru_utime + children.ru_stime,
        busy_s=(sum(fields) - idle) / _ticks(),
        idle_s=idle / _ticks(),
    )


def per_payment(
    before: Snapshot, after: Snapshot, payments: int, *, generator_s: float | None = None
) -> dict[str, float]:
    """Milliseconds of CPU a payment between two snapshots. PostgreSQL's counts the processes
    alive at the second (a process started in between counts whole; one that ended in between,
    such as a short autovacuum worker, is missed: its time still shows in the machine's).
    `generator_s` is the generator's CPU in the window as it measured it itself: the Python
    generator's processes are not waited-for children until they end, so the snapshots miss them."""
    if payments <= 0:
        return {}
    postgres = sum(cpu - before.postgres_s.get(pid, 0.0) for pid, cpu in after.postgres_s.items())
    generator = after.generator_s - before.generator_s if generator_s is None else generator_s

    def ms(seconds: float) -> float:
        return round(1000 * seconds / payments, 3)

    return {
        "server": ms(after.server_s - before.server_s),
        "postgres": ms(postgres),
        "generator": ms(generator),
        "machine_busy": ms(after.busy_s - before.busy_s),
        "machine_idle": ms(after.idle_s - before.idle_s),
    }
