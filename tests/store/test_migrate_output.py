"""What a start prints about migrations: one line per migration applied, nothing when none ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from strongroom.store.migrate import MIGRATIONS, upgrade


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRONGROOM_")}
    command = [sys.executable, "-c", "from strongroom.cli import main; main()", *args, "--data-dir", str(data_dir)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=True)


def test_upgrade_returns_each_revision_applied_once(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    revisions = sorted(p.name.split("_")[0] for p in (MIGRATIONS / "versions").glob("[0-9]*.py"))
    assert upgrade(url) == revisions
    assert upgrade(url) == []


def test_a_start_with_nothing_to_migrate_prints_no_alembic_chatter(tmp_path: Path):
    first = _cli(tmp_path, "migrate")
    lines = (first.stdout + first.stderr).splitlines()
    applied = [line for line in lines if line.startswith("migration ")]
    assert len(applied) == len(list((MIGRATIONS / "versions").glob("[0-9]*.py")))
    assert applied[0].startswith("migration 0001 applied: ")
    assert not [line for line in lines if "alembic" in line or "Context impl" in line]

    again = _cli(tmp_path, "migrate")
    assert (again.stdout + again.stderr).splitlines() == ["migrations applied"]
