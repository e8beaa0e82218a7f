"""SECURITY.md P1 and P3 on PostgreSQL, as an assessor would check them: after payments with the
Amex test card and a 4-digit CVC, a `pg_dump` of the whole database (every table, every
merchant) contains neither the card number nor the CVC.

PostgreSQL only (the SQLite files, WAL and logs are checked in test_card_storage.py), selected like
the other PostgreSQL-only modules: without STRONGROOM_TEST_DATABASE_URL nothing is collected.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from sqlalchemy.engine import make_url
from tests.factories import card_payment_method, create_intent

AMEX = "378282246310005"


def _as_value(digits: str) -> re.Pattern[bytes]:
    """The digits as a value of their own (a COPY field, a JSON value), not inside a longer run of
    digits, an id or a random token: base64url tokens and timestamps' fractions hold "-8167_" or
    ".8167+" by chance now and then."""
    return re.compile(rb"(?<![0-9A-Za-z_.\-])" + digits.encode() + rb"(?![0-9A-Za-z_.\-])")


def _absent_cvc(dump: bytes) -> str:
    """A 4-digit CVC that is not yet a value anywhere in the database. The session's database is
    shared with the other tests, whose amounts are drawn at random (hypothesis): a fixed CVC was
    once found there as an `amount_refunded` of 8167, written by another test, not by the vault."""
    for candidate in ("8167", "7391", "6053", "9274", "5813", "4729", "3958"):
        if _as_value(candidate).search(dump) is None:
            return candidate
    raise AssertionError("every candidate CVC is already a value in the database")


PG_PARAMS = ["postgres"] if os.environ.get("STRONGROOM_TEST_DATABASE_URL") else []
pytestmark = pytest.mark.parametrize("database_url", PG_PARAMS, indirect=True)
__test__ = bool(PG_PARAMS)


def _pg_dump(database_url: str) -> bytes:
    pg_dump = shutil.which("pg_dump")
    assert pg_dump is not None, "pg_dump (postgresql-client) is required"
    url = make_url(database_url)
    argv = [pg_dump, "--no-owner", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
    argv += ["-U", url.username or "postgres", url.database or "postgres"]
    return subprocess.run(argv, check=True, capture_output=True, timeout=120).stdout


async def test_p1_p3_pg_dump_holds_neither_pan_nor_cvc_after_amex_payments(api, database_url):
    cvc = _absent_cvc(_pg_dump(database_url))
    for _ in range(3):
        pm = await card_payment_method(api, number=AMEX, cvc=cvc)
        intent = await create_intent(api, amount=2500, payment_method=pm["id"], confirm=True)
        assert intent["status"] == "succeeded"
    dump = _pg_dump(database_url)
    assert b"vault_cards" in dump and b"payment_intents" in dump  # a real, complete dump
    assert AMEX.encode() not in dump
    assert b"-".join([AMEX[:4].encode(), AMEX[4:10].encode(), AMEX[10:].encode()]) not in dump
    found = _as_value(cvc).search(dump)
    assert found is None, f"the CVC is in the dump: {dump[found.start() - 80 : found.end() + 80]!r}"
