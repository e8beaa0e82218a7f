"""Tamper evidence (issue 4 item 7, SECURITY.md C4): a modified ciphertext, nonce, wrapped DEK or
binding (the row moved to another merchant or token) raises `VaultIntegrityError`, logs at
critical level without key or card material, and never decrypts to garbage; a payment that meets
it fails with a Stripe-shaped error, not a 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs
from tests.conftest import new_merchant
from tests.factories import card_payment_method, create_intent

from strongroom.app import create_app
from strongroom.sensitive import Secret
from strongroom.vault.keystore import VaultIntegrityError
from strongroom.vault.tables import vault_cards, vault_keys

from .conftest import hsm_settings

VISA = "4242424242424242"
AMEX = "378282246310005"


async def _stored(vault, merchant_id: str, pan: str) -> str:
    async with vault.keys.db.tx() as conn:
        return (await vault.tokenize(conn, merchant_id, Secret(pan), None)).token


async def _card(vault, merchant_id: str, token: str) -> dict[str, Any]:
    async with vault.keys.db.read() as conn:
        query = sa.select(vault_cards).where(vault_cards.c.merchant_id == merchant_id, vault_cards.c.token == token)
        return dict((await conn.execute(query)).mappings().one())


async def _set_card(vault, merchant_id: str, token: str, **values: Any) -> None:
    async with vault.keys.db.tx() as conn:
        where = (vault_cards.c.merchant_id == merchant_id, vault_cards.c.token == token)
        await conn.execute(vault_cards.update().where(*where).values(**values))


def _flip(data: bytes, at: int = 0) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0x01
    return bytes(changed)


async def _assert_tamper_detected(vault, merchant_id: str, token: str, what: str) -> None:
    with capture_logs() as logs, pytest.raises(VaultIntegrityError):
        async with vault.keys.db.read() as conn:
            await vault.reveal(conn, merchant_id, token)
    alerts = [entry for entry in logs if entry["log_level"] == "critical"]
    assert [entry["event"] for entry in alerts] == ["vault.integrity_failure"]
    assert alerts[0]["what"] == what
    logged = repr(logs)
    for pan in (VISA, AMEX):
        assert pan not in logged
    assert "key" not in {k for entry in alerts for k in entry if k not in ("dek_id", "what")}


async def test_modified_ciphertext_is_detected(make_vault):
    async with make_vault() as vault:
        token = await _stored(vault, "acct_t", VISA)
        row = await _card(vault, "acct_t", token)
        await _set_card(vault, "acct_t", token, ciphertext=_flip(bytes(row["ciphertext"]), 3))
        await _assert_tamper_detected(vault, "acct_t", token, "ciphertext")
        # The authentication tag itself (the last 16 bytes) is covered too.
        await _set_card(vault, "acct_t", token, ciphertext=_flip(bytes(row["ciphertext"]), -1))
        await _assert_tamper_detected(vault, "acct_t", token, "ciphertext")


async def test_modified_nonce_is_detected(make_vault):
    async with make_vault() as vault:
        token = await _stored(vault, "acct_t", AMEX)
        row = await _card(vault, "acct_t", token)
        await _set_card(vault, "acct_t", token, nonce=_flip(bytes(row["nonce"]), 11))
        await _assert_tamper_detected(vault, "acct_t", token, "ciphertext")


async def test_modified_wrapped_dek_is_detected(make_vault):
    async with make_vault() as vault:
        token = await _stored(vault, "acct_t", VISA)
        row = await _card(vault, "acct_t", token)
    async with make_vault() as restarted:  # a process that has not unwrapped this DEK yet
        async with restarted.keys.db.tx() as conn:
            wrapped = bytes(await conn.scalar(sa.select(vault_keys.c.wrapped_key)))
            await conn.execute(vault_keys.update().values(wrapped_key=_flip(wrapped, 20)))
        with capture_logs() as logs, pytest.raises(VaultIntegrityError):
            async with restarted.keys.db.read() as conn:
                await restarted.reveal(conn, "acct_t", token)
    assert [(e["event"], e["what"]) for e in logs if e["log_level"] == "critical"] == [
        ("vault.integrity_failure", "wrapped_dek")
    ]
    assert row["dek_id"] in repr(logs)


async def test_c4_ciphertext_moved_to_another_row_fails_to_decrypt(make_vault):
    async with make_vault() as vault:
        victim = await _stored(vault, "acct_victim", AMEX)
        attacker_same_merchant = await _stored(vault, "acct_victim", VISA)
        attacker = await _stored(vault, "acct_attacker", VISA)
        stolen = await _card(vault, "acct_victim", victim)
        moved = {k: stolen[k] for k in ("dek_id", "nonce", "ciphertext")}
        # Same merchant, another token: the AAD names the token.
        await _set_card(vault, "acct_victim", attacker_same_merchant, **moved)
        await _assert_tamper_detected(vault, "acct_victim", attacker_same_merchant, "ciphertext")
        # Another merchant's row: the AAD names the merchant.
        await _set_card(vault, "acct_attacker", attacker, **moved)
        await _assert_tamper_detected(vault, "acct_attacker", attacker, "ciphertext")
        # The original row still opens: detection did not destroy anything.
        async with vault.keys.db.read() as conn:
            assert (await vault.reveal(conn, "acct_victim", victim)).reveal() == AMEX


@pytest.fixture
async def hsm_app(softhsm, hsm_token, fresh_database_url, tmp_path) -> AsyncIterator[Any]:
    application = create_app(hsm_settings(softhsm, hsm_token, fresh_database_url, tmp_path), background=False)
    async with application.router.lifespan_context(application):
        yield application


async def test_tampered_wrapped_dek_fails_a_payment_cleanly(hsm_app, capfd):
    services = hsm_app.state.services
    merchant = await new_merchant(services)
    transport = httpx.ASGITransport(app=hsm_app)
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as api:
        await card_payment_method(api, AMEX, cvc="1234")
        async with services.db.tx() as conn:
            wrapped = bytes(await conn.scalar(sa.select(vault_keys.c.wrapped_key)))
            await conn.execute(vault_keys.update().values(wrapped_key=_flip(wrapped, 9)))
        services.payments.vault.keys.forget()  # as after dek_cache_ttl_s, or in another process

        for response in (
            await api.post("/v1/payment_methods", data=_card_form(VISA)),
            await api.post(
                "/v1/payment_intents",
                data={"amount": "1500", "currency": "usd", "payment_method": "pm_card_visa", "confirm": "true"},
            ),
        ):
            assert response.status_code == 402, response.text
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("card_error", "processing_error")
            assert VISA not in response.text
        # Nothing half-done: the failed requests left no intent and no payment method behind.
        async with services.db.read() as conn:
            for table, expected in (("payment_methods", 1), ("payment_intents", 0), ("vault_cards", 1)):
                query = sa.text(f"SELECT count(*) FROM {table} WHERE merchant_id = :m")  # noqa: S608 - fixed names
                assert await conn.scalar(query, {"m": merchant.id}) == expected, table
        # Requests that do not need the vault still work.
        intent = await create_intent(api, amount=700)
        assert intent["status"] == "requires_payment_method"
    logged = capfd.readouterr()
    assert "vault.integrity_failure" in logged.out + logged.err
    assert VISA not in logged.out + logged.err


async def test_tampered_card_fails_its_payment_cleanly(hsm_app):
    """The relay opens the card for the processor: a failed integrity check there fails the
    payment the ordinary way (402 card_error, failed charge, intent back to
    requires_payment_method); nothing reaches the processor and nothing stays `processing`."""
    services = hsm_app.state.services
    merchant = await new_merchant(services)
    transport = httpx.ASGITransport(app=hsm_app)
    headers = {"Authorization": f"Bearer {merchant.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as api:
        pm = await card_payment_method(api, VISA)
        async with services.db.tx() as conn:
            token = await conn.scalar(
                sa.text("SELECT vault_token FROM payment_methods WHERE merchant_id = :m AND id = :pm"),
                {"m": merchant.id, "pm": pm["id"]},
            )
        row = await _card(services.payments.vault, merchant.id, token)
        await _set_card(services.payments.vault, merchant.id, token, ciphertext=_flip(bytes(row["ciphertext"]), 0))

        with capture_logs() as logs:
            response = await api.post(
                "/v1/payment_intents",
                data={"amount": "1500", "currency": "usd", "payment_method": pm["id"], "confirm": "true"},
            )
        assert response.status_code == 402, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"], error["decline_code"]) == (
            "card_error",
            "processing_error",
            "processing_error",
        )
        intent = error["payment_intent"]
        assert intent["status"] == "requires_payment_method"
        assert intent["last_payment_error"]["code"] == "processing_error"
        assert await services.sandbox.count_authorizations(merchant.id) == 0
    assert ("vault.integrity_failure", "critical") in {(e["event"], e["log_level"]) for e in logs}
    assert VISA not in repr(logs)


def _card_form(number: str) -> dict[str, str]:
    return {"type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2034"}
