"""Envelope encryption under the SoftHSM2 keystore (SECURITY.md C1, C2, T3): nonces, DEK budgets
and crypto-periods, reveal."""

from __future__ import annotations

import asyncio
import collections

import pytest
import sqlalchemy as sa
from pydantic import ValidationError

from strongroom.errors import ResourceMissing
from strongroom.sensitive import Secret
from strongroom.settings import VaultSettings
from strongroom.vault.tables import vault_cards, vault_keks, vault_keys

VISA = "4242424242424242"
AMEX = "378282246310005"


async def _cards(vault) -> list[sa.RowMapping]:
    async with vault.keys.db.read() as conn:
        return list((await conn.execute(sa.select(vault_cards))).mappings().all())


async def _deks(vault) -> dict[str, sa.RowMapping]:
    async with vault.keys.db.read() as conn:
        return {row["id"]: row for row in (await conn.execute(sa.select(vault_keys))).mappings().all()}


async def test_c1_nonces_are_96_bit_random_and_never_repeat(make_vault):
    async with make_vault() as vault, vault.keys.db.tx() as conn:
        for _ in range(500):
            await vault.tokenize(conn, "acct_c1", Secret(VISA), None)
    nonces = [bytes(row["nonce"]) for row in await _cards(vault)]
    assert len(nonces) == 500
    assert {len(nonce) for nonce in nonces} == {12}
    assert len(set(nonces)) == 500


async def test_c1_dek_retired_when_its_encryption_bound_is_reached(make_vault):
    async with make_vault(dek_max_encryptions=5, dek_reserve_block=2) as vault:
        tokens = []
        for _ in range(12):
            async with vault.keys.db.tx() as conn:
                tokens.append((await vault.tokenize(conn, "acct_bound", Secret(AMEX), None)).token)
        per_dek = collections.Counter(row["dek_id"] for row in await _cards(vault))
        deks = await _deks(vault)
        async with vault.keys.db.read() as conn:
            revealed = {(await vault.reveal(conn, "acct_bound", token)).reveal() for token in tokens}
    assert max(per_dek.values()) <= 5
    assert sorted(per_dek.values()) == [2, 5, 5]
    retired = [dek for dek in deks.values() if dek["state"] == "retired"]
    assert len(retired) == 2
    assert all(dek["encryptions_reserved"] >= 5 for dek in retired)
    assert [dek["state"] for dek in deks.values()].count("active") == 1
    assert revealed == {AMEX}


async def test_c1_encryption_bound_holds_across_processes(make_vault):
    """Two vaults on one database are two api processes: blocks are reserved in the database, so
    together they never exceed a DEK's bound."""
    async with (
        make_vault(dek_max_encryptions=7, dek_reserve_block=3) as one,
        make_vault(dek_max_encryptions=7, dek_reserve_block=3) as two,
    ):

        async def store(vault, n: int) -> None:
            for _ in range(n):
                async with vault.keys.db.tx() as conn:
                    await vault.tokenize(conn, "acct_two", Secret(VISA), None)

        await asyncio.gather(store(one, 20), store(two, 20))
        per_dek = collections.Counter(row["dek_id"] for row in await _cards(one))
    assert sum(per_dek.values()) == 40
    assert max(per_dek.values()) <= 7


async def test_c1_encryptions_of_a_rolled_back_transaction_still_count(make_vault):
    """A tokenization whose transaction rolls back has still used the DEK once: the budget never
    hands the same encryptions out twice (on SQLite the reservation rolls back with it and this
    process drops it; on PostgreSQL the reservation was committed on its own)."""
    async with make_vault(dek_max_encryptions=4, dek_reserve_block=2) as vault:
        for _ in range(3):
            with pytest.raises(LookupError):
                async with vault.keys.db.tx() as conn:
                    await vault.tokenize(conn, "acct_rb", Secret(VISA), None)
                    raise LookupError("the request failed after tokenizing")
        for _ in range(9):
            async with vault.keys.db.tx() as conn:
                await vault.tokenize(conn, "acct_rb", Secret(VISA), None)
        per_dek = collections.Counter(row["dek_id"] for row in await _cards(vault))
        deks = await _deks(vault)
    assert sum(per_dek.values()) == 9
    assert max(per_dek.values()) <= 4
    for dek_id, cards in per_dek.items():
        assert deks[dek_id]["encryptions_reserved"] >= cards


def test_c2_crypto_periods_configured_per_key_type():
    defaults = VaultSettings()
    assert defaults.kek_crypto_period_days == 365
    assert defaults.dek_crypto_period_days == 90
    assert defaults.dek_max_encryptions == 2**24
    # NIST SP 800-57 originator-usage periods: at most two years; SP 800-38D: at most 2^32 uses.
    for too_long in ({"kek_crypto_period_days": 800}, {"dek_crypto_period_days": 800}, {"dek_max_encryptions": 2**33}):
        with pytest.raises(ValidationError):
            VaultSettings(**too_long)


async def test_c2_dek_retired_when_its_crypto_period_ends(make_vault):
    period_days = 0.5 / 86400  # half a second
    async with make_vault(dek_crypto_period_days=period_days, kek_crypto_period_days=30) as vault:
        async with vault.keys.db.tx() as conn:
            first = await vault.tokenize(conn, "acct_c2", Secret(VISA), None)
        await asyncio.sleep(0.6)
        vault.keys.forget()  # as after dek_cache_ttl_s: the next encryption asks the database
        async with vault.keys.db.tx() as conn:
            second = await vault.tokenize(conn, "acct_c2", Secret(VISA), None)
        cards = {row["token"]: row["dek_id"] for row in await _cards(vault)}
        deks = await _deks(vault)
        async with vault.keys.db.read() as conn:
            kek = (await conn.execute(sa.select(vault_keks))).mappings().one()
            assert (await vault.reveal(conn, "acct_c2", first.token)).reveal() == VISA
    assert cards[first.token] != cards[second.token]
    assert deks[cards[first.token]]["state"] == "retired"
    assert deks[cards[second.token]]["state"] == "active"
    assert kek["state"] == "active"  # the KEK's own period (30 days) is not over


async def test_t3_reveal_is_bound_to_the_merchant(make_vault):
    async with make_vault() as vault:
        async with vault.keys.db.tx() as conn:
            stored = await vault.tokenize(conn, "acct_owner", Secret(AMEX), Secret("1234"))
        async with vault.keys.db.read() as conn:
            assert (await vault.reveal(conn, "acct_owner", stored.token)).reveal() == AMEX
            with pytest.raises(ResourceMissing) as other:
                await vault.reveal(conn, "acct_other", stored.token)
            with pytest.raises(ResourceMissing) as missing:
                await vault.reveal(conn, "acct_owner", "card_" + "x" * 32)
    assert other.value.http_status == missing.value.http_status == 404
    assert type(other.value) is type(missing.value)
    assert AMEX not in str(other.value)


async def test_deks_survive_a_restart_only_wrapped(make_vault):
    """A new process (a fresh vault, empty caches) reads the card by unwrapping its DEK in the HSM;
    the database never held the DEK in the clear."""
    async with make_vault() as vault, vault.keys.db.tx() as conn:
        stored = await vault.tokenize(conn, "acct_restart", Secret(VISA), None)
    async with make_vault() as restarted, restarted.keys.db.read() as conn:
        assert (await restarted.reveal(conn, "acct_restart", stored.token)).reveal() == VISA
        wrapped = bytes(await conn.scalar(sa.select(vault_keys.c.wrapped_key)))
    assert len(wrapped) == 40  # RFC 5649 output for a 32-byte key
