"""CPU per payment, from /proc (the benchmark's `cpu_ms_per_payment`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from strongroom.bench import cpu


def test_per_payment_is_each_sides_cpu_between_snapshots_divided_by_payments() -> None:
    before = cpu.Snapshot(server_s=10.0, postgres_s={1: 5.0, 2: 1.0, 3: 0.5}, generator_s=0.5, busy_s=100, idle_s=7)
    # PostgreSQL process 3 ended in between (missed), 4 started in between (counted whole).
    after = cpu.Snapshot(server_s=14.0, postgres_s={1: 6.5, 2: 1.5, 4: 0.2}, generator_s=0.7, busy_s=107, idle_s=8)
    assert cpu.per_payment(before, after, 1000) == {
        "server": 4.0,
        "postgres": 2.2,
        "generator": 0.2,
        "machine_busy": 7.0,
        "machine_idle": 1.0,
    }
    assert cpu.per_payment(before, after, 0) == {}


def test_the_server_is_its_whole_process_tree() -> None:
    """A worker's CPU counts as the server's: a child of this process that burns ~0.4 s of CPU
    shows in this process's tree, and not in PostgreSQL's processes."""
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        before = cpu.snapshot(os.getpid())
        deadline = time.monotonic() + 20
        while cpu.snapshot(os.getpid()).server_s - before.server_s < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = cpu.snapshot(os.getpid())
        assert after.server_s - before.server_s >= 0.3
        assert child.pid not in after.postgres_s
        assert after.busy_s > before.busy_s
    finally:
        child.kill()
        child.wait()
