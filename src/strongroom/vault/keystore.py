"""Key-encryption keys (KEKs) and the fingerprint key: the interface, and the development keystore.

Envelope encryption (see `strongroom.vault.keys`): card numbers are encrypted with data-encryption
keys (DEKs), and a DEK is stored only wrapped by a versioned KEK that never leaves the keystore.
Two keystores implement `Keystore`:

- `Pkcs11Keystore` (`strongroom.vault.pkcs11`): KEKs generated in an HSM, non-extractable, DEKs
  wrapped there with CKM_AES_KEY_WRAP_PAD (RFC 5649). The production keystore.
- `DevelopmentKeystore` (here): the embedded default. KEKs are local 0600 files, one per version,
  wrapping with AES key wrap with padding (RFC 5649, from `cryptography`), with a loud warning on
  every start that this is not an HSM. Production refuses it unless explicitly allowed.

Keystore methods are synchronous and may block on a device: the vault calls them from a worker
thread, and only off the per-request path (unwrapped DEKs and fingerprint keys are cached).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from strongroom.connectors.base import ProcessorUnavailable
from strongroom.errors import StrongroomError
from strongroom.sensitive import Secret
from strongroom.settings import Settings

log = structlog.get_logger(__name__)

DEK_BYTES = 32  # AES-256
# KEK version 0 is the single HKDF-derived key that encrypted cards before envelope encryption
# (migration 0005). Only the development keystore can produce it; rotation re-encrypts its cards.
LEGACY_KEK_VERSION = 0


class VaultIntegrityError(StrongroomError, ProcessorUnavailable):
    """A ciphertext, nonce, wrapped DEK or its binding (AAD: merchant and token) failed
    authentication. Tampering or corruption: never answered with garbage, always with this.

    Rendered as Stripe's `processing_error` card error (402), without saying why to the caller;
    the alert-level log line says why to operators. It is also a `ProcessorUnavailable`: met while
    the relay opens a payment's card, it is a definitive failure before anything reached the
    processor, so the payment fails the ordinary way (failed charge, intent back to
    `requires_payment_method`) instead of staying in `processing`."""

    http_status = 402
    type = "card_error"
    default_code = "processing_error"

    def __init__(self) -> None:
        super().__init__("An error occurred while processing your card. Try again later or with a different card.")
        self.raw_code = "vault_integrity"


class KeyMissing(Exception):
    """The keystore holds no KEK of this version (destroyed, or never created)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"no key-encryption key of version {version}")
        self.version = version


class Keystore(Protocol):
    """What the vault needs from a keystore. Every method may block; none is on the hot path."""

    name: str
    wrap_mechanism: str

    def create_kek(self, version: int) -> None:
        """Generates KEK `version` inside the keystore; a no-op if it exists (a resumed rotation)."""

    def has_kek(self, version: int) -> bool: ...

    def kek_versions(self) -> list[int]: ...

    def destroy_kek(self, version: int) -> None:
        """PCI DSS 3.7.5: destroys the key material of a retired version; a no-op if already gone."""

    def new_dek(self, kek_version: int) -> tuple[Secret[bytes], bytes]:
        """A fresh random DEK and the same DEK wrapped by KEK `kek_version`."""

    def wrap(self, kek_version: int, dek: Secret[bytes]) -> bytes: ...

    def unwrap(self, kek_version: int, wrapped: bytes) -> Secret[bytes]:
        """The DEK, in memory only. Raises `VaultIntegrityError` if `wrapped` fails its integrity
        check, `KeyMissing` if the KEK version does not exist."""

    def merchant_fingerprint_key(self, merchant_id: str) -> Secret[bytes]:
        """PCI DSS 3.5.1.1: the per-merchant key of the keyed card fingerprint."""

    def close(self) -> None: ...


_KEK_FILE = re.compile(r"^vault-kek-v([0-9]+)\.key$")


class DevelopmentKeystore:
    """Local key files under DATA_DIR/keys/ (0600). Refused outside development mode unless
    `vault.allow_development_keystore` (see `strongroom.app.build_keystore`).

    `root_file` is the key file of the pre-envelope vault: it still keys the card fingerprints
    (so fingerprints stored before migration 0005 stay comparable) and derives the legacy key
    (KEK version 0) that opens cards stored before 0005 until a rotation re-encrypts them."""

    name = "development"
    wrap_mechanism = "AES key wrap with padding (RFC 5649), local key file"

    def __init__(self, directory: Path, root_file: Path | None = None) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._root = _load_or_create(root_file or directory / "dev-kek.key")
        self._keks: dict[int, bytes] = {}
        log.warning(
            "vault.development_keystore",
            path=str(directory),
            message="DEVELOPMENT KEYSTORE: keys are in local files, not in an HSM. Not for production.",
        )

    def _path(self, version: int) -> Path:
        return self._dir / f"vault-kek-v{version}.key"

    def create_kek(self, version: int) -> None:
        if version <= LEGACY_KEK_VERSION:
            raise ValueError("KEK versions start at 1")
        _load_or_create(self._path(version))

    def has_kek(self, version: int) -> bool:
        return version == LEGACY_KEK_VERSION or self._path(version).exists()

    def kek_versions(self) -> list[int]:
        found = (_KEK_FILE.match(p.name) for p in self._dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def destroy_kek(self, version: int) -> None:
        path = self._path(version)
        self._keks.pop(version, None)
        with contextlib.suppress(FileNotFoundError):
            # Overwrite before unlinking: a best effort on a file system (an HSM does it properly).
            with path.open("r+b") as fh:
                fh.write(secrets.token_bytes(DEK_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()

    def _kek(self, version: int) -> bytes:
        key = self._keks.get(version)
        if key is None:
            path = self._path(version)
            if not path.exists():
                raise KeyMissing(version)
            key = self._keks[version] = _read_key(path)
        return key

    def new_dek(self, kek_version: int) -> tuple[Secret[bytes], bytes]:
        dek = Secret(secrets.token_bytes(DEK_BYTES))
        return dek, self.wrap(kek_version, dek)

    def wrap(self, kek_version: int, dek: Secret[bytes]) -> bytes:
        return aes_key_wrap_with_padding(self._kek(kek_version), dek.reveal())

    def unwrap(self, kek_version: int, wrapped: bytes) -> Secret[bytes]:
        if kek_version == LEGACY_KEK_VERSION:
            return Secret(_derive(self._root, b"strongroom/vault/pan-encryption/v1"))
        try:
            dek = aes_key_unwrap_with_padding(self._kek(kek_version), wrapped)
        except InvalidUnwrap:
            raise VaultIntegrityError() from None
        if len(dek) != DEK_BYTES:
            raise VaultIntegrityError()
        return Secret(dek)

    def merchant_fingerprint_key(self, merchant_id: str) -> Secret[bytes]:
        # Same derivation as before envelope encryption, so stored fingerprints keep matching.
        return Secret(_derive(self._root, b"strongroom/vault/fingerprint/v1/" + merchant_id.encode()))

    def close(self) -> None:
        self._keks.clear()


def _derive(root: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(root)


def _load_or_create(path: Path) -> bytes:
    """32 random bytes in a 0600 file, created on first use (O_EXCL: two processes starting at
    once agree on one key)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(DEK_BYTES))
            fh.flush()
            os.fsync(fh.fileno())
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path} must not be readable by group or others (mode {mode:o})")
    data = path.read_bytes()
    if len(data) != DEK_BYTES:
        raise ValueError(f"{path} must hold exactly {DEK_BYTES} bytes")
    return data


def open_keystore(settings: Settings) -> Keystore:
    """The keystore the settings choose, as Warehouse picks a backend: PKCS#11 when an HSM module
    is configured; otherwise the development keystore, which production refuses unless
    `vault.allow_development_keystore` says otherwise."""
    if settings.hsm_module is not None:
        from strongroom.vault.pkcs11 import Pkcs11Keystore

        if not settings.hsm_token_label or settings.hsm_pin is None:
            raise RuntimeError("STRONGROOM_HSM_MODULE needs STRONGROOM_HSM_TOKEN_LABEL and STRONGROOM_HSM_PIN")
        return Pkcs11Keystore(
            settings.hsm_module, settings.hsm_token_label, Secret(settings.hsm_pin.get_secret_value())
        )
    if not settings.development and not settings.vault.allow_development_keystore:
        raise RuntimeError(
            "Production mode needs an HSM: set STRONGROOM_HSM_MODULE, STRONGROOM_HSM_TOKEN_LABEL and "
            "STRONGROOM_HSM_PIN (or, knowingly, STRONGROOM_VAULT__ALLOW_DEVELOPMENT_KEYSTORE=true)."
        )
    root = settings.vault.key_file or settings.data_dir / "keys" / "dev-kek.key"
    return DevelopmentKeystore(root.parent, root)
