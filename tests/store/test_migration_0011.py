"""Migration 0011 (SECURITY.md P3, I2): idempotency keys at rest only as their HMAC."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic import command
from tests.conftest import DATABASES
from tests.store.test_migrations import _fresh, _query

from strongroom.store.migrate import alembic_config, upgrade

_CLEAR = (
    "INSERT INTO idempotency_keys (merchant_id, livemode, key, fingerprint, method, path, created, locked_at) "
    "VALUES ('acct_1', false, 'order-6011111111111117', :fp, 'POST', '/v1/customers', CURRENT_TIMESTAMP, NULL)"
)
_HASHED = (
    "INSERT INTO idempotency_keys (merchant_id, livemode, key_hash, fingerprint, method, path, created) "
    "VALUES ('acct_1', false, :digest, :fp, 'POST', '/v1/customers', CURRENT_TIMESTAMP)"
)


@pytest.mark.parametrize("backend", DATABASES)
def test_pci_3_5_1_0011_drops_keys_stored_in_clear_and_keeps_only_their_hash(backend: str, tmp_path: Path) -> None:
    url, drop = _fresh(backend, tmp_path)
    rows = "SELECT count(*) FROM idempotency_keys"
    try:
        upgrade(url, "0010")
        asyncio.run(_query(url, _CLEAR, fp=bytes(32)))
        upgrade(url, "0011")
        # The secret the keys are hashed under is not the migration's to read: the rows go.
        assert asyncio.run(_query(url, rows)) == [(0,)]
        asyncio.run(_query(url, _HASHED, digest=bytes(range(32)), fp=bytes(32)))
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            asyncio.run(_query(url, _HASHED, digest=bytes(range(32)), fp=bytes(32)))
        command.downgrade(alembic_config(url), "0010")
        assert asyncio.run(_query(url, rows)) == [(0,)]
        asyncio.run(_query(url, _CLEAR, fp=bytes(32)))
    finally:
        drop()
