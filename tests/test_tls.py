"""PCI DSS 4.2.1 (SECURITY.md P8): `strongroom serve --tls-cert --tls-key` offers TLS 1.3 only by
default, TLS 1.2 at most as a configured floor and then with forward-secret AEAD suites only.

Real listeners: `strongroom serve` processes with a certificate made by `strongroom certs dev`,
scanned by testssl.sh (the Debian package; CI installs it) and probed with Python `ssl` clients
that offer exactly one protocol or suite. The default listener runs two uvicorn workers, so the
TLS policy is also proven to reach spawned worker processes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from strongroom.tls import TLS12_CIPHERS, TlsPolicy, server_context
from tests.e2e.conftest import _cli, _environment, _free_port, _stop, _tail

pytestmark = pytest.mark.e2e

STARTUP_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0
# testssl.sh with these options takes 10-25 s here; the limit only catches a hung scan.
TESTSSL_TIMEOUT_S = 240.0
# Protocols, forward secrecy, and every suite each protocol offers (-E tries all testssl.sh knows).
TESTSSL_OPTIONS = ("--quiet", "--warnings", "off", "--color", "0", "--protocols", "--fs", "-E")
ECDHE_AEAD_TLS12 = frozenset(TLS12_CIPHERS.split(":"))
CBC_ECDHE_SUITES = "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA"
RSA_KX_SUITES = "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA"


@dataclass(frozen=True)
class DevCerts:
    cert: Path
    key: Path


@dataclass(frozen=True)
class TlsServer:
    host: str
    port: int
    certs: DevCerts
    secret_key: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.certs.cert)


def _strongroom(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _cli(*args), env=_environment(None), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
    )


def _dev_certs(out: Path, *extra: str) -> DevCerts:
    done = _strongroom("certs", "dev", "--out", str(out), *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return DevCerts(out / "cert.pem", out / "key.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return _dev_certs(tmp_path_factory.mktemp("certs") / "dev", "--host", "strongroom.test")


def _wait_tls_healthy(proc: subprocess.Popen[bytes], server: TlsServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(server.log_path, 60)}")
        try:
            if httpx.get(f"{server.url}/healthz", verify=server.client_context(), timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{_tail(server.log_path, 60)}")


def _serve_tls(root: Path, certs: DevCerts, *, workers: int, min_version: str | None) -> Iterator[TlsServer]:
    env = _environment(None)
    if min_version is not None:
        env["STRONGROOM_HTTP__TLS_MIN_VERSION"] = min_version
    log_path = root / "server.log"
    port = _free_port()
    args = ["serve", "--port", str(port), "--data-dir", str(root / "data"), "--workers", str(workers)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            _cli(*args, "--tls-cert", str(certs.cert), "--tls-key", str(certs.key)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        pending = TlsServer("127.0.0.1", port, certs, "", log_path)
        _wait_tls_healthy(proc, pending)
        key = next(word for word in log_path.read_text().split() if word.startswith("sk_test_"))
        yield TlsServer("127.0.0.1", port, certs, key, log_path)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory, certs: DevCerts) -> Iterator[TlsServer]:
    """No TLS setting at all: the default policy, behind two worker processes."""
    yield from _serve_tls(tmp_path_factory.mktemp("tls-default"), certs, workers=2, min_version=None)


@pytest.fixture(scope="module")
def tls12_server(tmp_path_factory: pytest.TempPathFactory, certs: DevCerts) -> Iterator[TlsServer]:
    """`http.tls_min_version = "1.2"` (through its environment variable)."""
    yield from _serve_tls(tmp_path_factory.mktemp("tls-12"), certs, workers=1, min_version="1.2")


def _testssl(server: TlsServer, json_path: Path) -> dict[str, str]:
    """testssl.sh's findings by id. A missing testssl.sh fails the test: CI installs it."""
    binary = shutil.which("testssl") or shutil.which("testssl.sh")
    assert binary is not None, "testssl.sh is not installed (Debian: apt-get install testssl.sh)"
    done = subprocess.run(
        [binary, *TESTSSL_OPTIONS, "--jsonfile", str(json_path), f"{server.host}:{server.port}"],
        capture_output=True,
        text=True,
        timeout=TESTSSL_TIMEOUT_S,
        check=False,
    )
    assert json_path.exists(), f"testssl.sh wrote no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return {entry["id"]: entry["finding"] for entry in json.loads(json_path.read_text())}


@dataclass(frozen=True)
class OfferedSuite:
    protocol: str  # "1.2", "1.3"
    name: str  # OpenSSL's name
    key_exchange: str  # "ECDH", "DH", "RSA", …
    encryption: str  # "AESGCM", "ChaCha20", "AES" (CBC), …


def _offered_suites(findings: dict[str, str]) -> list[OfferedSuite]:
    """testssl.sh's `-E` rows, e.g. "TLS 1.2 xc02c ECDHE-ECDSA-AES256-GCM-SHA384 ECDH 253 AESGCM 256 …"."""
    rows = [finding.split() for key, finding in findings.items() if key.startswith("cipher-")]
    return [OfferedSuite(row[1], row[3], row[4], row[6]) for row in rows]


def _assert_forward_secret_aead_only(findings: dict[str, str], suites: list[OfferedSuite]) -> None:
    assert findings["PFS"] == "offered"
    forward_secret = set(findings["PFS_ciphers"].split())
    for suite in suites:
        assert suite.name in forward_secret, f"{suite} lacks forward secrecy"
        assert suite.key_exchange == "ECDH", suite
        assert suite.encryption in {"AESGCM", "ChaCha20"}, f"{suite} is not AEAD"


def test_p8_tls_listener_offers_tls13_only_with_forward_secret_aead_suites(
    default_server: TlsServer, tmp_path: Path
) -> None:
    findings = _testssl(default_server, tmp_path / "testssl.json")
    assert findings["TLS1_3"].startswith("offered"), findings
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2"):
        assert findings[old] == "not offered", (old, findings[old])
    suites = _offered_suites(findings)
    assert suites, findings
    assert {suite.protocol for suite in suites} == {"1.3"}
    _assert_forward_secret_aead_only(findings, suites)


def test_p8_tls12_floor_offers_only_ecdhe_aead_suites(tls12_server: TlsServer, tmp_path: Path) -> None:
    findings = _testssl(tls12_server, tmp_path / "testssl.json")
    assert findings["TLS1_2"].startswith("offered")
    assert findings["TLS1_3"].startswith("offered")
    for old in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[old] == "not offered", (old, findings[old])
    suites = _offered_suites(findings)
    tls12 = {suite.name for suite in suites if suite.protocol == "1.2"}
    assert tls12, findings
    assert tls12 <= ECDHE_AEAD_TLS12
    _assert_forward_secret_aead_only(findings, suites)


def _handshake(server: TlsServer, version: ssl.TLSVersion, ciphers: str | None = None) -> tuple[str, str]:
    """(protocol, suite) negotiated by a client that offers only `version` (and `ciphers`)."""
    context = server.client_context()
    context.minimum_version = context.maximum_version = version
    if ciphers is not None:
        context.set_ciphers(ciphers)
    with (
        socket.create_connection((server.host, server.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None
        return str(tls.version()), cipher[0]


def test_p8_default_listener_refuses_tls12_clients(default_server: TlsServer) -> None:
    for _ in range(4):  # two workers: every one of them enforces the policy
        assert _handshake(default_server, ssl.TLSVersion.TLSv1_3)[0] == "TLSv1.3"
        with pytest.raises(ssl.SSLError):
            _handshake(default_server, ssl.TLSVersion.TLSv1_2)


def test_p8_tls12_floor_accepts_ecdhe_aead_and_refuses_cbc(tls12_server: TlsServer) -> None:
    protocol, suite = _handshake(tls12_server, ssl.TLSVersion.TLSv1_2)
    assert protocol == "TLSv1.2"
    assert suite in ECDHE_AEAD_TLS12
    for aead in ECDHE_AEAD_TLS12 & {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"}:
        assert _handshake(tls12_server, ssl.TLSVersion.TLSv1_2, aead) == ("TLSv1.2", aead)
    with pytest.raises(ssl.SSLError):
        _handshake(tls12_server, ssl.TLSVersion.TLSv1_2, CBC_ECDHE_SUITES)


def _rsa_certificate(out: Path) -> TlsPolicy:
    """An RSA certificate: with it, RSA key exchange and CBC suites would be possible at all."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (out / "rsa.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "rsa.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TlsPolicy(out / "rsa.pem", out / "rsa.key", "1.2")


def test_p8_tls12_policy_refuses_rsa_key_exchange_even_with_an_rsa_certificate(tmp_path: Path) -> None:
    """The context `serve` uses, on a local socket: static-RSA and CBC suites are refused although
    the certificate would allow them; ECDHE-RSA with AES-GCM is accepted."""
    policy = _rsa_certificate(tmp_path)
    server_ctx = server_context(policy)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    attempts = 3

    def accept() -> None:
        for _ in range(attempts):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    server = TlsServer("127.0.0.1", port, DevCerts(policy.cert_file, policy.key_file), "", tmp_path / "none")
    try:
        with pytest.raises(ssl.SSLError):
            _handshake(server, ssl.TLSVersion.TLSv1_2, RSA_KX_SUITES)
        with pytest.raises(ssl.SSLError):
            _handshake(server, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-SHA256:ECDHE-RSA-AES256-SHA")
        assert _handshake(server, ssl.TLSVersion.TLSv1_2, "ECDHE-RSA-AES128-GCM-SHA256")[1] == (
            "ECDHE-RSA-AES128-GCM-SHA256"
        )
    finally:
        thread.join(timeout=10)
        listener.close()


def test_p8_pci_4_2_1_tls_listener_sends_hsts_on_every_kind_of_response(default_server: TlsServer) -> None:
    """RFC 6797: Strict-Transport-Security from the TLS listener (two years, subdomains), on
    answers, refusals and unknown paths alike, beside no-store and nosniff."""
    with httpx.Client(base_url=default_server.url, verify=default_server.client_context()) as client:
        key = {"Authorization": f"Bearer {default_server.secret_key}"}
        responses = [
            client.get("/v1/customers", headers=key),
            client.get("/v1/customers"),
            client.get("/no/such/path", headers=key),
            client.get("/healthz"),
        ]
    assert [r.status_code for r in responses] == [200, 401, 404, 200]
    for response in responses:
        assert response.headers["strict-transport-security"] == "max-age=63072000; includeSubDomains"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"


def test_tls_server_publishes_https_urls(default_server: TlsServer) -> None:
    """PUBLIC_URL follows the listener: the 3-D Secure redirect a customer follows is https."""
    with httpx.Client(
        base_url=default_server.url,
        verify=default_server.client_context(),
        headers={"Authorization": f"Bearer {default_server.secret_key}"},
    ) as api:
        response = api.post(
            "/v1/payment_intents",
            data={
                "amount": "1000",
                "currency": "usd",
                "payment_method": "pm_card_threeDSecureRequired",
                "confirm": "true",
            },
        )
    assert response.status_code == 200, response.text
    intent = response.json()
    assert intent["status"] == "requires_action"
    assert intent["next_action"]["redirect_to_url"]["url"].startswith(f"{default_server.url}/")
    assert f"Strongroom listening on {default_server.url}" in default_server.log_path.read_text()


def test_certs_dev_makes_a_p256_self_signed_localhost_certificate_and_a_0600_key(certs: DevCerts) -> None:
    assert certs.key.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    assert cert.issuer == cert.subject
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "strongroom.test"} <= set(names.get_values_for_type(x509.DNSName))
    assert ipaddress.ip_address("127.0.0.1") in names.get_values_for_type(x509.IPAddress)
    key = serialization.load_pem_private_key(certs.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == public_key.public_numbers()


def test_certs_dev_keeps_existing_files_unless_forced(tmp_path: Path) -> None:
    first = _dev_certs(tmp_path)
    before = first.cert.read_bytes()
    again = _strongroom("certs", "dev", "--out", str(tmp_path))
    assert again.returncode == 1
    assert "--force" in again.stderr
    assert first.cert.read_bytes() == before
    _dev_certs(tmp_path, "--force")
    assert first.cert.read_bytes() != before
    assert first.key.stat().st_mode & 0o777 == 0o600


def test_serve_refuses_a_key_that_does_not_match_the_certificate(tmp_path: Path, certs: DevCerts) -> None:
    other = _dev_certs(tmp_path / "other")
    data_dir = str(tmp_path / "data")
    mismatched = _strongroom(
        "serve", "--data-dir", data_dir, "--tls-cert", str(certs.cert), "--tls-key", str(other.key)
    )
    assert mismatched.returncode == 2
    assert "cannot load TLS certificate" in mismatched.stderr
    half = _strongroom("serve", "--data-dir", data_dir, "--tls-cert", str(certs.cert))
    assert half.returncode == 2
    assert "both a certificate" in half.stderr
