"""`strongroom serve --workers N`: each worker listens on a socket of its own on the same port
(SO_REUSEPORT), so connections opened together and kept are spread by the kernel rather than
taken by whichever worker woke first; a worker that dies is replaced on its socket, and uvicorn's
SIGTTIN / SIGTTOU add a worker with a socket or retire one with its socket, so every connection
the kernel sends somewhere is answered. Real processes, read from /proc."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from strongroom.workers import reuseport_sockets
from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _tail, _wait_healthy

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[Served]:
    port, log = _free_port(), tmp_path / "server.log"
    args = ["serve", "--port", str(port), "--data-dir", str(tmp_path / "data"), "--workers", "2"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            _cli(*args), env=_environment(None), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        served = Served(proc, port, log)
        # Healthy is one worker answering; the other may still be starting.
        _wait_for(lambda: len(_tcp(port)[0]) == 2, 60, "two listening sockets", served)
        yield served
    finally:
        _stop(proc)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def _tcp(port: int) -> tuple[set[str], dict[str, str]]:
    """Listening sockets on `port` (inodes) and established connections to it (inode by peer)."""
    listening, established = set(), {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if int(local.split(":")[1], 16) != port:
            continue
        if state == "0A":
            listening.add(inode)
        elif state == "01":
            established[remote] = inode
    return listening, established


def _workers(served: Served) -> list[int]:
    children = Path(f"/proc/{served.proc.pid}/task/{served.proc.pid}/children").read_text().split()
    # The supervisor's children: uvicorn's workers (spawned) and multiprocessing's resource tracker.
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _wait_for(condition: object, timeout_s: float, what: str, served: Served) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout_s} s:\n{_tail(served.log, 40)}")


def _answers_every_new_connection(served: Served, count: int = 40) -> None:
    """Each on a new connection, so each lands on a socket the kernel picks: one that nobody
    accepts on would leave its share unanswered (a timeout here)."""
    for _ in range(count):
        with httpx.Client(base_url=served.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200


def test_each_worker_listens_on_its_own_socket_and_kept_connections_are_spread(two_workers: Served) -> None:
    workers = _workers(two_workers)
    assert len(workers) == 2
    listening, _ = _tcp(two_workers.port)
    owned = {pid: _socket_inodes(pid) & listening for pid in workers}
    # Two listening sockets on the port, one in each worker (not one shared by both).
    assert len(listening) == 2 and all(len(inodes) == 1 for inodes in owned.values())
    assert owned[workers[0]] != owned[workers[1]]

    # 64 connections opened together and kept, as a proxy's pool or a load generator does.
    clients = [httpx.Client(base_url=two_workers.url, timeout=10) for _ in range(64)]
    try:
        for client in clients:
            assert client.get("/healthz").status_code == 200
        _, established = _tcp(two_workers.port)
        by_worker = Counter(pid for pid in workers for inode in established.values() if inode in _socket_inodes(pid))
        assert sum(by_worker.values()) == 64
        # Spread by the kernel's hash: each worker holds some, neither nearly all. (With one shared
        # socket, runs of wrk's 32 connections were split as unevenly as 2/30.) The chance that a
        # fair 64-way split leaves a worker 12 or fewer is about 1 in 400 000.
        assert min(by_worker.values()) > 12, by_worker
    finally:
        for client in clients:
            client.close()


def test_a_worker_that_dies_is_replaced_on_its_socket_and_every_new_connection_is_answered(
    two_workers: Served,
) -> None:
    workers = _workers(two_workers)
    listening, _ = _tcp(two_workers.port)
    victim = workers[0]
    victim_socket = _socket_inodes(victim) & listening
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = _workers(two_workers)
        return len(now) == 2 and victim not in now

    _wait_for(replaced, 60, "no replacement worker", two_workers)
    replacement = next(pid for pid in _workers(two_workers) if pid not in workers)
    # The replacement serves the dead worker's socket: the same one, still open in the parent.
    _wait_for(lambda: _socket_inodes(replacement) & listening == victim_socket, 60, "socket not handed on", two_workers)
    _wait_healthy(two_workers.proc, two_workers.url, two_workers.log)
    _answers_every_new_connection(two_workers)


def test_reuseport_sockets_share_one_port_even_when_the_port_is_chosen_by_the_system() -> None:
    sockets = reuseport_sockets("127.0.0.1", 0, 3)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and ports != {0}
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            sock.listen(8)
    finally:
        for sock in sockets:
            sock.close()


def test_a_port_held_without_reuseport_refuses_the_workers_sockets() -> None:
    """SO_REUSEPORT joins only sockets that all asked for it: a port held by another program
    (without it) is refused, as a plain bind would be, and nothing is left open."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(OSError):
            reuseport_sockets("127.0.0.1", port, 2)


def test_sigttou_retires_a_worker_and_its_socket_leaves_the_port(two_workers: Served) -> None:
    os.kill(two_workers.proc.pid, signal.SIGTTOU)
    _wait_for(lambda: len(_workers(two_workers)) == 1, 60, "one worker left", two_workers)
    _wait_for(lambda: len(_tcp(two_workers.port)[0]) == 1, 30, "one listening socket left", two_workers)
    (worker,) = _workers(two_workers)
    assert _socket_inodes(worker) & _tcp(two_workers.port)[0]
    _answers_every_new_connection(two_workers)


def test_sigttin_adds_a_worker_on_a_socket_of_its_own(two_workers: Served) -> None:
    os.kill(two_workers.proc.pid, signal.SIGTTIN)
    _wait_for(lambda: len(_tcp(two_workers.port)[0]) == 3, 60, "three listening sockets", two_workers)
    workers = _workers(two_workers)
    listening = _tcp(two_workers.port)[0]
    assert len(workers) == 3
    assert sorted(len(_socket_inodes(pid) & listening) for pid in workers) == [1, 1, 1]
    _answers_every_new_connection(two_workers)


def test_sighup_replaces_every_worker_on_the_socket_it_served(two_workers: Served) -> None:
    workers = _workers(two_workers)
    listening = _tcp(two_workers.port)[0]
    served = sorted(sorted(_socket_inodes(pid) & listening) for pid in workers)
    os.kill(two_workers.proc.pid, signal.SIGHUP)

    def replaced() -> bool:
        now = _workers(two_workers)
        return len(now) == 2 and not set(now) & set(workers)

    _wait_for(replaced, 120, "both workers replaced", two_workers)
    replacements = _workers(two_workers)
    # The same two listening sockets, each now served by the replacement of its worker.
    assert _tcp(two_workers.port)[0] == listening
    assert sorted(sorted(_socket_inodes(pid) & listening) for pid in replacements) == served
    _answers_every_new_connection(two_workers)


class _Worker:
    """A supervisor's worker process, as restart_all sees one: ready in time or not."""

    def __init__(self, pid: int, ready: bool) -> None:
        self.pid, self.ready = pid, ready
        self.events: list[str] = []

    def wait_until_ready(self, timeout: float, should_exit: object) -> bool:
        return self.ready

    def kill(self) -> None:
        self.events.append("kill")

    def terminate(self) -> None:
        self.events.append("terminate")

    def join(self) -> None:
        self.events.append("join")


def test_a_restart_whose_replacement_is_not_ready_keeps_the_old_workers_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from uvicorn.config import Config

    from strongroom.workers import SocketPerWorker

    sockets = reuseport_sockets("127.0.0.1", 0, 2)
    try:
        supervisor = SocketPerWorker(Config("strongroom.app:app", workers=2), sockets)
        old = [_Worker(101, True), _Worker(102, True)]
        new = iter([_Worker(201, True), _Worker(202, False)])
        supervisor.processes = list(old)  # type: ignore[arg-type]
        supervisor._worker = lambda index: next(new)  # type: ignore[assignment,method-assign]
        # uvicorn's loggers do not propagate to the root logger that caplog listens on.
        uvicorn_log = logging.getLogger("uvicorn.error")
        uvicorn_log.addHandler(caplog.handler)
        try:
            supervisor.restart_all()
        finally:
            uvicorn_log.removeHandler(caplog.handler)
        # The first was replaced; the second's replacement was killed and the old one kept.
        assert [p.pid for p in supervisor.processes] == [201, 102]  # type: ignore[attr-defined]
        assert old[0].events == ["terminate", "join"] and old[1].events == []
        assert "[202] was not ready in time; keeping worker [102]" in caplog.text
    finally:
        for sock in sockets:
            sock.close()
