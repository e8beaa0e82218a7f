"""What is left of a card at rest (SECURITY.md P1, P3, P4, T1).

On SQLite the raw database files are read byte by byte, as an attacker with a copy of the data dir
would: these tests run the embedded default (SQLite at DATA_DIR/strongroom.db, its -wal and -shm
files, the development keys) in a data dir of their own, so that nothing another test stored can
hide or fake a finding. On PostgreSQL the same questions are asked through SQL.

C4 (ciphertext moved to another row fails to decrypt) is tested with the other tamper cases in
tests/vault/test_tamper.py, through `Vault.reveal`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from tests.conftest import Merchant, new_merchant

from strongroom.api.http import Services
from strongroom.app import create_app
from strongroom.idempotency import service as idempotency
from strongroom.idempotency.tables import idempotency_keys
from strongroom.settings import Settings
from strongroom.store import metadata
from strongroom.store.migrate import upgrade
from strongroom.vault.tables import vault_cards

VISA = "4242424242424242"
AMEX = "378282246310005"
AMEX_CVC = "1234"
# A CVC as a value of its own: not part of a longer run of digits (timestamps, amounts, epochs).
CVC_TOKEN = re.compile(rb"(?<![0-9])" + AMEX_CVC.encode() + rb"(?![0-9])")


@dataclass
class Store:
    settings: Settings
    services: Services
    app: Any

    @property
    def is_sqlite(self) -> bool:
        return self.services.db.is_sqlite

    def files(self) -> list[Path]:
        """Every file the embedded default keeps: the database (parsed from the settings), its
        -wal and -shm companions, and everything else under the data dir."""
        database = Path(make_url(self.settings.effective_database_url).database or "")
        assert database.is_file()
        companions = [Path(f"{database}-wal"), Path(f"{database}-shm")]
        assert companions[0].is_file(), "WAL mode: recent writes live in the -wal file"
        under_data_dir = [p for p in self.settings.data_dir.rglob("*") if p.is_file()]
        return sorted({database, *companions, *under_data_dir})


@pytest.fixture(scope="module")
def embedded_settings(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Settings | None:
    """The embedded default in a fresh data dir (SQLite sessions only; migrated before the loop runs)."""
    if make_url(database_url).get_backend_name() != "sqlite":
        return None
    settings = Settings(data_dir=tmp_path_factory.mktemp("embedded"), database_url=None)
    upgrade(settings.effective_database_url)
    return settings


@pytest.fixture(scope="module")
async def store(embedded_settings: Settings | None, app: Any, settings: Settings) -> AsyncIterator[Store]:
    if embedded_settings is None:
        yield Store(settings, app.state.services, app)
        return
    embedded = create_app(embedded_settings, background=False)
    async with embedded.router.lifespan_context(embedded):
        yield Store(embedded_settings, embedded.state.services, embedded)


@pytest.fixture
async def owner(store: Store) -> Merchant:
    return await new_merchant(store.services, "Card owner")


@pytest.fixture
async def client(store: Store, owner: Merchant) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=store.app)
    headers = {"Authorization": f"Bearer {owner.secret_key}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", headers=headers) as http:
        yield http


def _card(number: str, cvc: str | None = None) -> dict[str, str]:
    form = {"type": "card", "card[number]": number, "card[exp_month]": "12", "card[exp_year]": "2034"}
    if cvc is not None:
        form["card[cvc]"] = cvc
    return form


async def _create(http: httpx.AsyncClient, form: dict[str, str], **headers: str) -> dict[str, Any]:
    response = await http.post("/v1/payment_methods", data=form, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _merchant_tables() -> Iterator[tuple[sa.Table, sa.Column[Any]]]:
    for table in metadata.sorted_tables:
        if "merchant_id" in table.c:
            yield table, table.c.merchant_id
        elif table.name == "merchants":
            yield table, table.c.id


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, dict | list):
        return orjson.dumps(value)
    return str(value).encode()


async def _merchant_rows(store: Store, merchant_id: str) -> list[tuple[str, str, bytes]]:
    """(table, column, value) for everything stored for one merchant, in every table that has one:
    a logical dump, like pg_dump of that merchant's rows."""
    values = []
    async with store.services.db.read() as conn:
        for table, owner_column in _merchant_tables():
            for row in (await conn.execute(sa.select(table).where(owner_column == merchant_id))).mappings():
                values += [(table.name, str(k), _as_bytes(v)) for k, v in row.items() if v is not None]
    assert {name for name, _, _ in values} >= {"merchants", "api_keys", "vault_cards", "payment_methods"}
    return values


async def _pan_hits_in_postgres(store: Store, pan: str) -> list[str]:
    """Tables whose rows, rendered as text (bytea as hex), contain the PAN in clear or as hex bytes."""
    hits = []
    async with store.services.db.read() as conn:
        for table in metadata.sorted_tables:
            quoted = conn.dialect.identifier_preparer.quote(table.name)
            # Table names come from our own metadata, never from input.
            where = "strpos(t::text, :pan) > 0 OR strpos(t::text, :pan_hex) > 0"
            query = sa.text(f"SELECT count(*) FROM {quoted} t WHERE {where}")  # noqa: S608
            if await conn.scalar(query, {"pan": pan, "pan_hex": pan.encode().hex()}):
                hits.append(table.name)
        in_ciphertext = await conn.scalar(
            sa.text("SELECT count(*) FROM vault_cards WHERE position(:pan IN ciphertext) > 0"), {"pan": pan.encode()}
        )
    return hits + (["vault_cards.ciphertext"] if in_ciphertext else [])


async def test_pci_3_5_1_pan_unreadable_at_rest(store, owner, client):
    await _create(client, _card(VISA))
    await _create(client, _card(AMEX, AMEX_CVC))

    for table, column, value in await _merchant_rows(store, owner.id):
        for pan in (VISA, AMEX):
            assert pan.encode() not in value, f"{pan} stored in {table}.{column}"
    if store.is_sqlite:
        for path in store.files():
            data = path.read_bytes()
            for pan in (VISA, AMEX):
                assert pan.encode() not in data, f"{pan} found in {path.name}"
    else:
        for pan in (VISA, AMEX):
            assert await _pan_hits_in_postgres(store, pan) == []


async def test_pci_3_5_1_vault_rows_hold_only_aes_gcm_ciphertext(store, owner, client):
    first = await _create(client, _card(VISA))
    second = await _create(client, _card(VISA))
    amex = await _create(client, _card(AMEX, AMEX_CVC))
    async with store.services.db.read() as conn:
        rows = (
            (await conn.execute(sa.select(vault_cards).where(vault_cards.c.merchant_id == owner.id))).mappings().all()
        )
    assert set(vault_cards.c.keys()) == {"merchant_id", "token", "dek_id", "nonce", "ciphertext", "created"}
    assert len(rows) == 3
    assert sorted(len(bytes(row["ciphertext"])) for row in rows) == sorted(
        len(pan) + 16
        for pan in (VISA, VISA, AMEX)  # AES-GCM: the plaintext's length plus a 16-byte tag
    )
    assert {len(bytes(row["nonce"])) for row in rows} == {12}  # NIST SP 800-38D: 96-bit nonces
    # T1: random nonces and tokens, so one card stored twice shares nothing at rest.
    assert len({bytes(row["nonce"]) for row in rows}) == 3
    assert len({bytes(row["ciphertext"]) for row in rows}) == 3
    assert len({row["token"] for row in rows}) == 3
    for row in rows:
        for pan in (VISA, AMEX):
            assert pan[6:-4] not in row["token"]
    # The API never hands out the vault's token: payment methods are the only handle.
    for pm in (first, second, amex):
        assert not any(row["token"] in orjson.dumps(pm).decode() for row in rows)


async def test_pci_3_3_1_no_cvc_stored_after_authorization(store, owner, client, capfd):
    pm = await _create(client, _card(AMEX, AMEX_CVC))
    response = await client.post(
        "/v1/payment_intents",
        data={"amount": "2000", "currency": "usd", "payment_method": pm["id"], "confirm": "true"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "succeeded"
    assert await store.services.sandbox.count_authorizations(owner.id) == 1

    # PCI DSS 3.3.1.2: the CVC does not outlive the authorization, not even in memory.
    async with store.services.db.read() as conn:
        token = await conn.scalar(
            sa.text("SELECT vault_token FROM payment_methods WHERE merchant_id = :m AND id = :pm"),
            {"m": owner.id, "pm": pm["id"]},
        )
    assert token is not None
    assert store.services.payments.vault.cvcs.take(owner.id, token) is None

    for table, column, value in await _merchant_rows(store, owner.id):
        assert not CVC_TOKEN.search(value), f"CVC stored in {table}.{column}"
    if store.is_sqlite:
        for path in store.files():
            assert not CVC_TOKEN.search(path.read_bytes()), f"CVC found in {path.name}"
    logged = capfd.readouterr()
    for text in (logged.out, logged.err):
        assert AMEX not in text
        assert not CVC_TOKEN.search(text.encode())


async def test_pci_3_5_1_1_idempotency_record_of_a_card_request_is_not_a_plain_hash(store, owner, client):
    """The idempotency record must not let the card be recovered: an unkeyed hash of the request
    can be matched by hashing the few PANs and CVCs that the stored BIN, last 4 and expiry leave
    (about 10^3 PANs times 10^4 CVCs for this Amex)."""
    form = _card(AMEX, AMEX_CVC)
    await _create(client, form, **{"Idempotency-Key": "card-request-1"})
    async with store.services.db.read() as conn:
        row = (
            (
                await conn.execute(
                    sa.select(idempotency_keys).where(
                        idempotency_keys.c.merchant_id == owner.id,
                        idempotency_keys.c.key_hash
                        == idempotency.scoped(store.services.hasher, owner.id, False, "card-request-1").digest,
                    )
                )
            )
            .mappings()
            .one()
        )
    as_received = {"type": "card", "card": {k[5:-1]: v for k, v in form.items() if k.startswith("card[")}}
    assert bytes(row["fingerprint"]) != idempotency.fingerprint("POST", "/v1/payment_methods", as_received)
    for value in row.values():
        assert AMEX.encode() not in _as_bytes(value)
        assert not CVC_TOKEN.search(_as_bytes(value))

    # The record still does its job: the same request replays, another card is a mismatch.
    replay = await client.post("/v1/payment_methods", data=form, headers={"Idempotency-Key": "card-request-1"})
    assert replay.headers["idempotent-replayed"] == "true"
    other = await client.post(
        "/v1/payment_methods", data=_card(VISA, "123"), headers={"Idempotency-Key": "card-request-1"}
    )
    assert other.status_code == 400
    assert other.json()["error"]["type"] == "idempotency_error"
    other_cvc = await client.post(
        "/v1/payment_methods", data=_card(AMEX, "4321"), headers={"Idempotency-Key": "card-request-1"}
    )
    assert other_cvc.status_code == 400
