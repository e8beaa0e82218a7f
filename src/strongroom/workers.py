"""Worker processes that each own a listening socket on the same port (SO_REUSEPORT).

uvicorn's supervisor hands all workers ONE listening socket, and whichever worker wakes first
accepts every connection waiting: clients that open their connections together and keep them
(a reverse proxy's keep-alive pool, a load generator) end up unevenly spread for the connections'
whole life. Measured with 2 workers and wrk's 32 connections, over 18 runs: splits from 16/16 to
2/30, on average 4.7 away from even; runs with the most uneven splits made ~12% fewer payments a
second than even ones (the crowded worker queues, the other idles with small group commits).

Here each worker listens on a socket of its own, all bound to the same address with SO_REUSEPORT,
and the kernel spreads new connections over them by a hash of each connection's addresses and
ports: no worker is favoured by being awake. The supervisor is uvicorn's (health checks, restarts
on SIGHUP or a worker's death), except that worker i always serves socket i, which the parent keeps
open so that a replacement worker serves the same socket (connections queued on it meanwhile wait
for it rather than being refused).

Linux lets a socket join a SO_REUSEPORT group only if it belongs to the same user as the group's
sockets: a program running as the server's user could take a share of its connections, but such
a program can read the server's keys and memory already. Run the server as its own user.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

logger = logging.getLogger("uvicorn.error")  # the supervisor's own log, as uvicorn's


def reuseport_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` sockets bound to (host, port) with SO_REUSEPORT, not yet listening (uvicorn
    listens with its backlog). Port 0 binds the first to a free port and the others to it."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            address = sock.getsockname()  # the port the first one got, when 0 was asked for
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class SocketPerWorker(Multiprocess):
    """uvicorn's Multiprocess, with worker i given sockets[i] alone (one socket per worker)."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        if len(sockets) != config.workers:
            raise ValueError(f"{config.workers} workers need as many sockets, not {len(sockets)}")
        super().__init__(config, sockets)

    def _worker(self, index: int) -> Process:
        process = Process(self.config, [self.sockets[index]])
        process.start()
        return process

    def init_processes(self) -> None:
        for index in range(self.processes_num):
            self.processes.append(self._worker(index))

    def restart_all(self) -> None:
        """SIGHUP, as uvicorn's: each replacement serves (on the same socket) before the worker it
        replaces is retired. One not ready in time is killed, and the restart stops there: the
        workers not yet replaced keep serving, and the error is logged."""
        for index, old_process in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new_process = self._worker(index)
            if not new_process.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new_process.kill()
                new_process.join()
                if not self.should_exit.is_set():
                    logger.error(
                        "New worker [%s] was not ready in time; keeping worker [%s] and aborting the restart.",
                        new_process.pid,
                        old_process.pid,
                    )
                return
            old_process.terminate()
            old_process.join()
            self.processes[index] = new_process

    def keep_subprocess_alive(self) -> None:
        """As uvicorn's: a worker that died (or hangs) is replaced on its own socket; one that
        failed before serving stops the server (it would fail the same way again)."""
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            self.processes[index] = self._worker(index)

    def handle_ttin(self) -> None:
        """SIGTTIN: one worker more, on a socket of its own joining the port's group."""
        (sock,) = reuseport_sockets(self.config.host, self.sockets[0].getsockname()[1], 1)
        self.sockets.append(sock)
        self.processes_num += 1
        self.processes.append(self._worker(len(self.processes)))

    def handle_ttou(self) -> None:
        """SIGTTOU: one worker fewer, and its socket leaves the group, so that no new connection
        is sent where nobody accepts any more. (Connections already queued on it when the worker
        stops are reset, as on any listener that closes.)"""
        if self.processes_num <= 1:
            return
        self.processes_num -= 1
        process, sock = self.processes.pop(), self.sockets.pop()
        sock.close()  # the parent's copy: the group drops the socket once the worker's closes too
        process.terminate()
        process.join()


def serve(config: Config) -> None:
    """Run `config.workers` workers, each on its own SO_REUSEPORT socket, until a signal."""
    supervisor = SocketPerWorker(config, reuseport_sockets(config.host, config.port, config.workers))
    try:
        supervisor.run()
    finally:
        for sock in supervisor.sockets:  # as many as the workers then (SIGTTIN/SIGTTOU change it)
            sock.close()
