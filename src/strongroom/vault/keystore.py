"""Key material for the vault.

Until the PKCS#11 keystore lands, the embedded default uses a development key file: 32 random
bytes, mode 0600, created on first run, with a loud warning that it is not an HSM. Data keys are
derived from it with HKDF so that encryption and fingerprinting never share a key.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

log = structlog.get_logger(__name__)


class Keystore(Protocol):
    key_version: int

    def encryption_key(self, version: int) -> bytes: ...

    def fingerprint_key(self, merchant_id: str) -> bytes: ...


class DevelopmentKeystore:
    """A local key file. Refused outside development mode (see `strongroom.app`)."""

    key_version = 1

    def __init__(self, path: Path) -> None:
        self._root = _load_or_create(path)
        self._enc = _derive(self._root, b"strongroom/vault/pan-encryption/v1")

    def encryption_key(self, version: int) -> bytes:
        if version != self.key_version:
            raise KeyError(f"unknown key version {version}")
        return self._enc

    def fingerprint_key(self, merchant_id: str) -> bytes:
        # PCI DSS 3.5.1.1: fingerprints are keyed hashes, and per merchant so that the same
        # card cannot be correlated across merchants.
        return _derive(self._root, b"strongroom/vault/fingerprint/v1/" + merchant_id.encode())


def _derive(root: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)


def _load_or_create(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} must not be readable by group or others (mode {mode:o})")
    log.warning(
        "vault.development_keystore",
        path=str(path),
        message="DEVELOPMENT KEYSTORE: keys are in a local file, not in an HSM. Not for production.",
    )
    data = path.read_bytes()
    if len(data) != 32:
        raise ValueError(f"{path} must hold exactly 32 bytes")
    return data
