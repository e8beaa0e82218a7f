"""Real processes: `serve` keeps a configured public URL, and `strongroom worker` runs and stops."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _wait_healthy

pytestmark = pytest.mark.e2e

PUBLIC_URL = "https://pay.shop.example"


def test_a_configured_public_url_reaches_the_3ds_redirect_in_every_worker(tmp_path: Path):
    env = _environment(None) | {"STRONGROOM_PUBLIC_URL": PUBLIC_URL}
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    command = _cli("serve", "--port", str(port), "--workers", "2", "--data-dir", str(tmp_path / "data"))
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(proc, url, log)
        key = re.search(r"sk_test_\w+", log.read_text())
        assert key, log.read_text()
        auth = (key.group(0), "")
        card = {"type": "card", "card[number]": "4000002500003155", "card[exp_month]": "12", "card[exp_year]": "2034"}
        redirects = set()
        # Several payments over new connections: both workers answer some of them.
        for i in range(8):
            with httpx.Client(base_url=url, auth=auth, timeout=10.0) as client:
                pm = client.post("/v1/payment_methods", data=card).json()
                pay = {"amount": "1000", "currency": "usd", "payment_method": pm["id"], "confirm": "true"}
                intent = client.post("/v1/payment_intents", data=pay, headers={"Idempotency-Key": f"pub-{i}"})
                assert intent.status_code == 200, intent.text
                redirects.add(intent.json()["next_action"]["redirect_to_url"]["url"].partition("?")[0])
        assert redirects and all(r.startswith(f"{PUBLIC_URL}/") for r in redirects), redirects
    finally:
        _stop(proc)


def test_strongroom_worker_runs_until_sigterm_and_stops_cleanly(tmp_path: Path):
    env = _environment(None)
    data_dir = tmp_path / "data"
    subprocess.run(_cli("migrate", "--data-dir", str(data_dir)), env=env, check=True, capture_output=True)
    log = tmp_path / "worker.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            _cli("worker", "--data-dir", str(data_dir)), env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 30
        while "worker.started" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "worker.started" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
        assert "worker.stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    status = subprocess.run(
        _cli("worker", "status", "--data-dir", str(data_dir)), env=env, check=True, capture_output=True, text=True
    ).stdout
    kinds = {line.split()[0] for line in status.splitlines()}
    assert {"recovery", "idempotency_purge", "retention_purge", "key_rotation"} <= kinds

