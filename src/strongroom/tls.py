"""TLS for `strongroom serve`: the listener's policy, and a development certificate.

PCI DSS 4.0.1 4.2.1 asks for strong cryptography on every channel that carries cardholder data.
Our reading, enforced here rather than left to defaults: TLS 1.3 only unless an operator lowers
the floor to TLS 1.2 (`http.tls_min_version = "1.2"`), and then the TLS 1.2 suites are only those
with forward secrecy (ephemeral ECDH) and authenticated encryption (AES-GCM, ChaCha20-Poly1305):
no RSA key exchange, no CBC, no SHA-1 MACs. Every TLS 1.3 suite is already both.

uvicorn would build its own `SSLContext` from `ssl_*` options, which cannot set a minimum version;
its `ssl_context_factory` hook hands it ours instead. The factory is a `functools.partial` of a
module-level function over a frozen `TlsPolicy`, so it pickles into uvicorn's spawned workers.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from uvicorn.config import Config

TlsVersion = Literal["1.3", "1.2"]

_MINIMUM_VERSIONS: dict[str, ssl.TLSVersion] = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}
# TLS 1.2 only: ECDHE key exchange (forward secrecy) with an AEAD cipher, strongest first. Named
# one by one so an assessor reads the exact list rather than an OpenSSL alias expansion.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
    )
)

DEV_CERT_NAME = "cert.pem"
DEV_KEY_NAME = "key.pem"
DEV_HOSTS_DEFAULT = ("localhost", "127.0.0.1", "::1")
# A development certificate is trusted by hand, so its lifetime is short: regenerating is one command.
DEV_VALID_DAYS = 90


class TlsConfigError(Exception):
    """The certificate, the key or the TLS policy cannot be used; the message says which."""


@dataclass(frozen=True)
class TlsPolicy:
    cert_file: Path
    key_file: Path
    min_version: TlsVersion = "1.3"


def server_context(policy: TlsPolicy) -> ssl.SSLContext:
    """A server `SSLContext` enforcing `policy`; TlsConfigError when the files cannot be used."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MINIMUM_VERSIONS[policy.min_version]
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_ciphers(TLS12_CIPHERS)
    # No compression (CRIME), no renegotiation; no TLS 1.2 session tickets, whose long-lived
    # ticket key would let one stolen key decrypt every resumed session (it undoes forward secrecy).
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE
    try:
        context.load_cert_chain(policy.cert_file, policy.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(
            f"cannot load TLS certificate {policy.cert_file} with key {policy.key_file}: {exc}"
        ) from None
    _check_suites(context)
    return context


def _check_suites(context: ssl.SSLContext) -> None:
    """Refuse to serve if this OpenSSL expanded the policy into anything weaker than intended."""
    for suite in context.get_ciphers():
        forward_secret = suite["protocol"] == "TLSv1.3" or suite["kea"] == "kx-ecdhe"
        if not (forward_secret and suite["aead"]):
            raise TlsConfigError(f"cipher suite {suite['name']} lacks forward secrecy or AEAD")


def uvicorn_context_factory(
    policy: TlsPolicy, config: Config, default_factory: Callable[[], ssl.SSLContext]
) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory` hook: our context, never uvicorn's default one."""
    return server_context(policy)


def uvicorn_factory(policy: TlsPolicy) -> Callable[[Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    return functools.partial(uvicorn_context_factory, policy)


@dataclass(frozen=True)
class DevCertificate:
    cert_file: Path
    key_file: Path
    hosts: tuple[str, ...]
    not_after: dt.datetime


def write_dev_certificate(
    out_dir: Path, hosts: Sequence[str] = (), *, overwrite: bool = False, valid_days: int = DEV_VALID_DAYS
) -> DevCertificate:
    """A self-signed ECDSA P-256 certificate for `hosts` (localhost, 127.0.0.1 and ::1 always) and
    its key, written as PEM into `out_dir`; the key file is created 0600. Existing files are kept
    unless `overwrite`, so a trusted certificate is never replaced by accident."""
    names = tuple(dict.fromkeys([*DEV_HOSTS_DEFAULT, *hosts]))
    cert_file, key_file = out_dir / DEV_CERT_NAME, out_dir / DEV_KEY_NAME
    if not overwrite:
        for path in (cert_file, key_file):
            if path.exists():
                raise TlsConfigError(f"{path} exists; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Strongroom development"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0] if len(names[0]) <= 64 else "localhost"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName([_general_name(host) for host in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_SERVER_KEY_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_file, key_pem)
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return DevCertificate(cert_file, key_file, names, certificate.not_valid_after_utc)


_SERVER_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """Create the file 0600 from the first byte: never world-readable, not even for an instant."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def listener_policy(cert_file: Path | None, key_file: Path | None, min_version: TlsVersion) -> TlsPolicy | None:
    """The checked policy for a listener, or None for plain HTTP (neither file given). A context is
    built once here so a bad certificate, key or pair fails at start-up, before any worker starts."""
    if cert_file is None and key_file is None:
        return None
    if cert_file is None or key_file is None:
        raise TlsConfigError("TLS needs both a certificate (--tls-cert) and its key (--tls-key)")
    policy = TlsPolicy(cert_file.resolve(), key_file.resolve(), min_version)
    server_context(policy)
    return policy
