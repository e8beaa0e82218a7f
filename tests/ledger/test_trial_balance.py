"""`strongroom ledger check`: recomputes balances from the entries and exits 1 on any discrepancy."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from strongroom.cli import app as cli
from strongroom.ledger import service as ledger
from tests.factories import paid_intent

_TXN = (
    "INSERT INTO ledger_transactions (merchant_id, id, livemode, created, source_type, source_id, kind, currency) "
    "VALUES (:m, :t, false, CURRENT_TIMESTAMP, 'charge', :s, 'capture', 'usd')"
)
_ENTRY = (
    "INSERT INTO ledger_entries (merchant_id, transaction_id, line, livemode, account, currency, amount_minor) "
    "VALUES (:m, :t, :line, false, :account, 'usd', :amount)"
)


async def test_check_passes_on_postings_and_reports_their_balances(api, services, merchant):
    intent = await paid_intent(api, amount=3000)
    response = await api.post("/v1/refunds", data={"payment_intent": intent["id"], "amount": "1000"})
    assert response.status_code == 200, response.text
    async with services.db.read() as conn:
        report = await ledger.check(conn, merchant_id=merchant.id)
        everything = await ledger.check(conn)
    assert report.ok, report.problems
    assert everything.ok, everything.problems
    assert (report.transactions, report.entries) == (2, 4)
    assert report.balances == {
        (merchant.id, False, "merchant_pending", "usd"): -3000,
        (merchant.id, False, "merchant_available", "usd"): 1000,
        (merchant.id, False, "processor_receivable:sandbox", "usd"): 2000,
    }


async def test_check_reports_unbalanced_negative_and_unknown(services, merchant):
    # Raw inserts (the only writes the database allows), rolled back so the shared database stays sound.
    async with services.db.engine.connect() as conn:
        tx = await conn.begin()
        try:
            m = merchant.id
            await conn.execute(sa.text(_TXN), {"m": m, "t": "txn_bad", "s": "ch_bad"})
            await conn.execute(
                sa.text(_ENTRY), {"m": m, "t": "txn_bad", "line": 0, "account": "merchant_pending", "amount": 500}
            )
            await conn.execute(sa.text(_ENTRY), {"m": m, "t": "txn_bad", "line": 1, "account": "cash", "amount": -1})
            await conn.execute(sa.text(_TXN), {"m": m, "t": "txn_empty", "s": "ch_empty"})
            report = await ledger.check(conn, merchant_id=m)
        finally:
            await tx.rollback()
    assert not report.ok
    text = "\n".join(report.problems)
    assert "txn_bad" in text and "does not sum to zero in usd: 499" in text
    assert "txn_empty" in text and "no entries" in text
    assert "merchant_pending" in text and "negative: -500" in text
    assert "account cash" in text and "not in the chart" in text
    async with services.db.read() as conn:
        assert (await ledger.check(conn, merchant_id=merchant.id)).ok


def _insert_unbalanced(db_file: Path) -> None:
    with sqlite3.connect(db_file) as conn:
        conn.execute(_TXN.replace(":m", "'acct_x'").replace(":t", "'txn_x'").replace(":s", "'ch_x'"))
        conn.execute(
            "INSERT INTO ledger_entries VALUES ('acct_x', 'txn_x', 0, 0, 'processor_receivable:sandbox', 'usd', 100)"
        )
        conn.execute("INSERT INTO ledger_entries VALUES ('acct_x', 'txn_x', 1, 0, 'merchant_pending', 'usd', -90)")


def test_cli_ledger_check_exit_codes(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("STRONGROOM_DATABASE_URL", raising=False)
    runner = CliRunner()
    clean = runner.invoke(cli, ["ledger", "check", "--data-dir", str(tmp_path)])
    assert clean.exit_code == 0, clean.output
    assert "ledger check ok" in clean.output

    _insert_unbalanced(tmp_path / "strongroom.db")
    broken = runner.invoke(cli, ["ledger", "check", "--data-dir", str(tmp_path)])
    assert broken.exit_code == 1, broken.output
    assert "ledger check FAILED: 1 discrepancies" in broken.output
    assert "transaction txn_x of acct_x does not sum to zero in usd: 10" in broken.output
