"""Reconciliation: the sandbox's settlement report against the ledger, through `strongroom
reconcile`; a matching report, a missing line, an amount mismatch, an unknown line, a report that
cannot be read; fees and settlements posted once, balances exact."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from strongroom.cli import app as cli
from strongroom.connectors.sandbox.settlement import fee_minor, settlement_movements
from strongroom.ledger import service as ledger
from strongroom.ledger.reconcile import Status, reconcile
from strongroom.ledger.reports import STRIPE_COLUMNS, ReportError, ReportFormat, parse, write_stripe
from strongroom.ledger.tables import reconciliation_items, reconciliation_runs
from strongroom.store.db import utcnow
from tests.factories import create_intent, paid_intent


async def _payments(api: httpx.AsyncClient) -> dict[str, Any]:
    """Automatic capture of 1000, manual capture of 1500 of 2000, and 3000 refunded by 1000."""
    a = await paid_intent(api, amount=1000)
    b = await create_intent(api, amount=2000, payment_method="pm_card_visa", confirm=True, capture_method="manual")
    captured = await api.post(f"/v1/payment_intents/{b['id']}/capture", data={"amount_to_capture": "1500"})
    assert captured.status_code == 200, captured.text
    c = await paid_intent(api, amount=3000)
    refund = await api.post("/v1/refunds", data={"payment_intent": c["id"], "amount": "1000"})
    assert refund.status_code == 200, refund.text
    return {"a": a, "b": b, "c": c}


async def _report(services: Any, since: dt.datetime, available_after: dt.timedelta = dt.timedelta(0)) -> str:
    out = io.StringIO()
    write_stripe(await settlement_movements(services.db, since=since, available_after=available_after), out)
    return out.getvalue()


def _rows(report: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(report)))


def _csv(rows: list[dict[str, str]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=STRIPE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


async def _balance(api: httpx.AsyncClient) -> tuple[int, int]:
    body = (await api.get("/v1/balance")).json()
    pending = {b["currency"]: b["amount"] for b in body["pending"]}
    available = {b["currency"]: b["amount"] for b in body["available"]}
    return pending["usd"], available["usd"]


async def _cli(settings: Any, tmp_path: Path, report: str, since: dt.datetime | None = None) -> Any:
    """`strongroom reconcile` as a user runs it (in a thread: the command runs its own event loop)."""
    path = tmp_path / "report.csv"
    path.write_text(report)
    env = {"STRONGROOM_DATABASE_URL": settings.database_url, "STRONGROOM_DATA_DIR": str(tmp_path)}
    args = ["reconcile", str(path), "--connector", "sandbox"]
    if since is not None:  # the report's interval: from the test's start until now
        args += [
            "--since",
            since.strftime("%Y-%m-%dT%H:%M:%S.%f"),
            "--until",
            utcnow().strftime("%Y-%m-%dT%H:%M:%S.%f"),
        ]
    return await asyncio.to_thread(CliRunner().invoke, cli, args, env=env)


async def test_a_matching_report_reconciles_and_books_fees_and_settlements_once(api, services, settings, tmp_path):
    since = utcnow()
    await _payments(api)
    report = await _report(services, since)
    assert [r["reporting_category"] for r in _rows(report)] == ["charge", "charge", "charge", "refund"]

    result = await _cli(settings, tmp_path, report, since)
    assert result.exit_code == 0, result.output
    assert "matched 4" in result.output and "reconciliation ok" in result.output

    fees = fee_minor(1000, "usd") + fee_minor(1500, "usd") + fee_minor(3000, "usd")
    assert fees == 59 + 74 + 117  # 2.9 % rounded half up, plus 30 cents
    # Everything settled: the merchant's money (captured - refunded - fees) is available.
    assert await _balance(api) == (0, 1000 + 1500 + 3000 - 1000 - fees)
    charges = [t for t in (await api.get("/v1/balance_transactions")).json()["data"] if t["type"] == "charge"]
    by_amount = {t["amount"]: t for t in charges}
    assert by_amount[1000]["fee"] == 59 and by_amount[1000]["net"] == 941
    assert {t["status"] for t in charges} == {"available"}

    again = await _cli(settings, tmp_path, report, since)
    assert again.exit_code == 0, again.output
    assert "posted 0 fees and 0 settlements" in again.output
    assert await _balance(api) == (0, 1000 + 1500 + 3000 - 1000 - fees)
    async with services.db.read() as conn:
        assert (await ledger.check(conn)).ok


async def test_a_missing_line_is_reported_and_exits_1(api, services, settings, tmp_path):
    since = utcnow()
    intents = await _payments(api)
    rows = _rows(await _report(services, since))
    dropped = rows.pop(0)  # the automatic capture of 1000
    assert dropped["gross"] == "10.00"

    result = await _cli(settings, tmp_path, _csv(rows), since)
    assert result.exit_code == 1, result.output
    assert "missing at processor 1" in result.output and "matched 3" in result.output
    assert intents["a"]["latest_charge"] in result.output
    async with services.db.read() as conn:
        run = (
            await conn.execute(sa.select(reconciliation_runs).order_by(reconciliation_runs.c.created.desc()))
        ).first()
        assert run is not None and (run.matched, run.missing_at_processor, run.lines) == (3, 1, 3)


async def test_an_amount_mismatch_is_reported_and_books_nothing_for_that_line(api, services, settings, tmp_path):
    since = utcnow()
    await _payments(api)
    rows = _rows(await _report(services, since))
    rows[0] |= {"gross": "10.01", "net": f"{10.01 - 0.59:.2f}"}

    result = await _cli(settings, tmp_path, _csv(rows), since)
    assert result.exit_code == 1, result.output
    assert "amount mismatch 1" in result.output
    assert "report 1001 usd" in result.output and "1000 usd" in result.output
    pending, _ = await _balance(api)
    # The mismatched charge's 1000 stays pending, untouched by a fee or a settlement.
    assert pending == 1000


async def test_a_line_the_ledger_never_saw_is_missing_in_ledger(api, services, settings, tmp_path):
    since = utcnow()
    await paid_intent(api, amount=1000)
    rows = _rows(await _report(services, since))
    rows.append(rows[0] | {"balance_transaction_id": "txn_unknown", "source_id": "sbx_ch_unknown"})

    result = await _cli(settings, tmp_path, _csv(rows), since)
    assert result.exit_code == 1, result.output
    assert "missing in ledger 1" in result.output and "sbx_ch_unknown" in result.output


async def test_funds_settle_only_once_available_on_has_passed(api, services):
    since = utcnow()
    await paid_intent(api, amount=2000)
    text = await _report(services, since, available_after=dt.timedelta(days=2))
    lines = parse(text, ReportFormat.STRIPE)

    first = await reconcile(
        services.db, "sandbox", lines, report_format=ReportFormat.STRIPE, report_bytes=b"", span=(since, utcnow())
    )
    assert (first.fees_posted, first.settlements_posted, first.unmatched) == (1, 0, [])
    assert await _balance(api) == (2000 - fee_minor(2000, "usd"), 0)

    later = utcnow() + dt.timedelta(days=3)
    second = await reconcile(
        services.db,
        "sandbox",
        lines,
        report_format=ReportFormat.STRIPE,
        report_bytes=b"",
        span=(since, utcnow()),
        now=later,
    )
    assert (second.fees_posted, second.settlements_posted) == (0, 1)
    assert await _balance(api) == (0, 2000 - fee_minor(2000, "usd"))


async def test_the_generic_format_reconciles_in_minor_units(api, services):
    since = utcnow()
    intent = await paid_intent(api, amount=5000, currency="jpy")
    movements = await settlement_movements(services.db, since=since)
    (movement,) = movements
    generic = (
        "id,type,created,available_on,currency,amount,fee,reference\n"
        f"{movement.processor_txn},charge,{movement.created.isoformat()},,jpy,5000,145,{movement.source_ref}\n"
    )
    lines = parse(generic, ReportFormat.GENERIC)
    run = await reconcile(
        services.db, "sandbox", lines, report_format=ReportFormat.GENERIC, report_bytes=b"", span=(since, utcnow())
    )
    assert [item.status for item in run.items] == [Status.MATCHED]
    body = (await api.get("/v1/balance")).json()
    assert {b["currency"]: b["amount"] for b in body["available"]}["jpy"] == 5000 - 145
    assert intent["currency"] == "jpy"


@pytest.mark.parametrize(
    ("report", "message"),
    [
        ("id,amount\n1,2\n", "missing columns"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,2026-11-24 10:00:00,,usd,10.001,0.00,10.00,charge,ch_1,,\n", "decimals"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,2026-11-24 10:00:00,,usd,10.00,0.59,10.00,charge,ch_1,,\n", "net"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,yesterday,,usd,10.00,0.00,10.00,charge,ch_1,,\n", "created_utc"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,2026-11-24 10:00:00,,zzz,10.00,0.00,10.00,charge,ch_1,,\n", "currency"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,2026-11-24 10:00:00,,usd,10.00,10.01,-0.01,charge,ch_1,,\n", "fee"),
        (",".join(STRIPE_COLUMNS) + "\ntxn_1,2026-11-24 10:00:00,,usd,10.00,-0.50,10.50,charge,ch_1,,\n", "fee"),
    ],
)
async def test_a_report_that_cannot_be_read_is_refused_whole_with_exit_2(services, settings, tmp_path, report, message):
    with pytest.raises(ReportError, match=message):
        parse(report, ReportFormat.STRIPE)
    async with services.db.read() as conn:
        runs_before = await conn.scalar(sa.select(sa.func.count()).select_from(reconciliation_runs))
    result = await _cli(settings, tmp_path, report)
    assert result.exit_code == 2, result.output
    async with services.db.read() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(reconciliation_runs)) == runs_before


async def test_every_unmatched_item_is_stored_with_its_amounts(api, services):
    since = utcnow()
    await paid_intent(api, amount=1200)
    text = await _report(services, since)
    rows = _rows(text)
    rows[0] |= {"gross": "12.50", "net": "11.85", "fee": "0.65"}
    lines = parse(_csv(rows), ReportFormat.STRIPE)
    run = await reconcile(
        services.db, "sandbox", lines, report_format=ReportFormat.STRIPE, report_bytes=b"x", span=(since, utcnow())
    )
    async with services.db.read() as conn:
        items = (
            (await conn.execute(sa.select(reconciliation_items).where(reconciliation_items.c.run_id == run.id)))
            .mappings()
            .all()
        )
    assert [(i["status"], i["ledger_amount"], i["report_amount"], i["report_fee"]) for i in items] == [
        ("amount_mismatch", 1200, 1250, 65)
    ]
