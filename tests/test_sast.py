"""PCI DSS 6.2.4 (SECURITY.md P9): static checks for injection and common coding flaws in src/.

bandit is not installed: ruff's `S` rules are its port (flake8-bandit: hard-coded secrets,
`subprocess` with a shell, `eval`/`exec`, unsafe deserialization, weak hashes, string-built SQL
(S608), binding to all interfaces …), so `ruff check --select S` is the bandit gate here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PYTHON_SOURCES = sorted(SRC.rglob("*.py"))

# The only places allowed to name test card numbers: the sandbox processor and Stripe's aliases.
PAN_ALLOWED = (
    SRC / "strongroom" / "connectors" / "sandbox",
    SRC / "strongroom" / "payments" / "sandbox_aliases.py",
)
# Stripe's published test card numbers (https://docs.stripe.com/testing), the ones people paste.
STRIPE_TEST_PANS = frozenset(
    {
        "4242424242424242",
        "4000056655665556",
        "5555555555554444",
        "2223003122003222",
        "5200828282828210",
        "5105105105105100",
        "378282246310005",
        "371449635398431",
        "6011111111111117",
        "6011000990139424",
        "6011981111111113",
        "3056930009020004",
        "36227206271667",
        "3566002020360505",
        "6200000000000005",
        "4000000000000002",
        "4000000000009995",
        "4000000000009987",
        "4000000000009979",
        "4000000000000069",
        "4000000000000127",
        "4000000000000119",
        "4000002500003155",
        "4000002760003184",
        "4000000000003220",
        "4000000000000077",
        "4000000000000341",
        "4000000760000002",
    }
)
# 13 to 19 digits, optionally grouped with single spaces or dashes ("4242 4242 4242 4242").
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
# f-strings (or %/format) handed to SQL execution: parameters must be bound, never interpolated.
_STRING_BUILT_SQL = ("text(f", ".execute(f", "exec_driver_sql(f")


def _string_built_sql(line: str) -> bool:
    normalized = re.sub(r"\s+", "", line).replace("f'", 'f"')
    return any(needle in normalized for needle in _STRING_BUILT_SQL)


def _relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _sandbox_pans() -> frozenset[str]:
    from strongroom.connectors.sandbox.cards import TEST_CARDS
    from strongroom.payments.sandbox_aliases import ALIASES

    return frozenset(card.number for card in TEST_CARDS) | frozenset(ALIASES.values())


def test_pci_6_2_4_ruff_security_rules_clean() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "S", "--no-cache", "--output-format", "concise", "src"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"ruff S (bandit) findings:\n{done.stdout}\n{done.stderr}"


def test_pci_6_2_4_no_string_built_sql() -> None:
    assert PYTHON_SOURCES, "no sources found under src/"
    hits = [
        f"{_relative(path)}:{number}: {line.strip()}"
        for path in PYTHON_SOURCES
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if _string_built_sql(line)
    ]
    assert hits == [], "SQL built from f-strings (bind parameters instead):\n" + "\n".join(hits)


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ('await conn.execute(f"SELECT * FROM t WHERE id = {x}")', True),
        ('sa.text( f"DROP DATABASE {name}")', True),
        ("conn.exec_driver_sql(f'VACUUM {table}')", True),
        ('await conn.execute(sa.text("SELECT 1 WHERE id = :id"), {"id": x})', False),
        ('log.info(f"executed {n}")', False),
    ],
)
def test_string_built_sql_detector(line: str, flagged: bool) -> None:
    assert _string_built_sql(line) is flagged


def test_no_stripe_test_pan_in_src_outside_the_sandbox() -> None:
    """A card number in application code means card data in logs, fixtures or defaults: only the
    sandbox processor and the `pm_card_*` alias table may hold (test) numbers."""
    known = STRIPE_TEST_PANS | _sandbox_pans()
    sources = [p for p in SRC.rglob("*") if p.is_file() and p.suffix in {".py", ".sql", ".toml", ".json", ".mako"}]
    assert sources
    hits = [
        f"{_relative(path)}:{number}: {match.group()}"
        for path in sources
        if not any(path == allowed or allowed in path.parents for allowed in PAN_ALLOWED)
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        for match in _DIGIT_RUN.finditer(line)
        if re.sub(r"[ -]", "", match.group()) in known
    ]
    assert hits == [], "Stripe test card numbers outside the sandbox:\n" + "\n".join(hits)


def test_the_pan_scan_sees_the_sandbox_numbers() -> None:
    """Guards the scan itself: the allowed files really contain numbers it recognises."""
    sandbox = (SRC / "strongroom" / "connectors" / "sandbox" / "cards.py").read_text()
    found = {re.sub(r"[ -]", "", m.group()) for m in _DIGIT_RUN.finditer(sandbox)}
    assert "4242424242424242" in found
    assert "4000002500003155" in found  # written grouped: "4000 0025 0000 3155"
    assert len(_sandbox_pans()) >= 20
