"""`pip install .` into a clean virtual environment, then `strongroom serve` with SoftHSM2 as its HSM.

This is what an operator does, so it catches what the editable development install hides: a
dependency missing from `pyproject.toml` (python-pkcs11 was), package data left out of the wheel
(migrations, the card form's static files), an import of a development-only package.

Versions are held to the pinned set (`requirements/main.txt`, hashes stripped, as constraints), so
the test checks our declared dependencies rather than whatever a registry published today.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import _free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
TOKEN = "strongroom-install"
PIN = "install-test-pin-5678"
INSTALL_TIMEOUT_S = 600.0
STARTUP_TIMEOUT_S = 60.0


def _constraints(path: Path) -> Path:
    pins = [
        line.rstrip(" \\")
        for line in (ROOT / "requirements" / "main.txt").read_text().splitlines()
        if re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*==", line)
    ]
    path.write_text("\n".join(pins) + "\n")
    return path


def _softhsm(root: Path) -> dict[str, str]:
    util = shutil.which("softhsm2-util")
    if util is None or not SOFTHSM_MODULE.exists():
        pytest.fail("SoftHSM2 is required: apt-get install softhsm2 (scripts/system-deps does)")
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = {"SOFTHSM2_CONF": str(conf)}
    init = [util, "--init-token", "--free", "--label", TOKEN, "--so-pin", "install-so-pin-0000", "--pin", PIN]
    subprocess.run(init, check=True, capture_output=True, env={**os.environ, **env})
    return env


def _kek_attributes(softhsm_conf: str) -> list[tuple[str, bool, bool]]:
    """(label, extractable, sensitive) of each secret key on the token, read in a child process:
    a PKCS#11 library reads SOFTHSM2_CONF once per process, and this one's is the suite's."""
    code = (
        "import pkcs11, sys\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        f"token = pkcs11.lib({str(SOFTHSM_MODULE)!r}).get_token(token_label={TOKEN!r})\n"
        f"with token.open(user_pin={PIN!r}) as s:\n"
        "    for k in s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):\n"
        "        print(k.label, k[Attribute.EXTRACTABLE], k[Attribute.SENSITIVE])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True,
        env={**os.environ, "SOFTHSM2_CONF": softhsm_conf},
    ).stdout
    return [(label, extractable == "True", sensitive == "True") for label, extractable, sensitive in
            (line.split() for line in out.splitlines())]


def _wait_ready(url: str, proc: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"strongroom serve exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"strongroom serve not ready in {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def test_pip_install_then_serve_with_softhsm2_takes_a_payment(tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = [
        str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "-c", str(_constraints(tmp_path / "constraints.txt")), str(ROOT),
    ]
    subprocess.run(install, check=True, timeout=INSTALL_TIMEOUT_S, cwd=tmp_path)

    hsm_env = _softhsm(tmp_path / "softhsm")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STRONGROOM_", "PYTHON"))}
    env |= hsm_env | {
        "STRONGROOM_HSM_MODULE": str(SOFTHSM_MODULE),
        "STRONGROOM_HSM_TOKEN_LABEL": TOKEN,
        "STRONGROOM_HSM_PIN": PIN,
    }
    log = tmp_path / "serve.log"
    serve = [str(venv / "bin" / "strongroom"), "serve", "--port", str(port), "--data-dir", str(data_dir)]
    with log.open("w") as out:
        # cwd outside the repository: the installed package, never ./src, must be what runs.
        proc = subprocess.Popen(serve, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        _wait_ready(url, proc, log)
        key = re.search(r"sk_test_\w+", log.read_text())
        assert key, log.read_text()
        auth = (key.group(0), "")
        card = {"type": "card", "card[number]": "4242424242424242", "card[exp_month]": "12",
                "card[exp_year]": "2034", "card[cvc]": "123"}
        pm = httpx.post(f"{url}/v1/payment_methods", data=card, auth=auth, timeout=10.0)
        assert pm.status_code == 200, pm.text
        intent = httpx.post(
            f"{url}/v1/payment_intents", auth=auth, timeout=10.0, headers={"Idempotency-Key": "install-1"},
            data={"amount": "2000", "currency": "usd", "payment_method": pm.json()["id"], "confirm": "true"},
        )
        assert intent.status_code == 200, intent.text
        assert (intent.json()["status"], intent.json()["amount_received"]) == ("succeeded", 2000)
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    # The key-encryption key lives in the HSM, non-extractable (PCI DSS 3.6.1), and the
    # development keystore's files were never written.
    keks = _kek_attributes(hsm_env["SOFTHSM2_CONF"])
    assert keks, "no secret key on the HSM token"
    assert all(not extractable and sensitive for _, extractable, sensitive in keks)
    assert not list(data_dir.rglob("*kek*"))
    assert "vault.development_keystore" not in log.read_text()
