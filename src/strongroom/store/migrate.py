"""Applying migrations programmatically (`strongroom migrate`, and `serve` on the embedded default)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from strongroom.store.db import private_sqlite_file

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> list[str]:
    """Blocking (runs its own event loop): call before the server's loop starts, or in a thread.

    Returns the revisions applied, each also logged as one line; Alembic's own INFO lines (its
    context and DDL mode) are silenced, so a start with nothing to migrate prints nothing."""
    private_sqlite_file(url)  # before SQLite creates it world-readable
    logging.getLogger("alembic").setLevel(logging.WARNING)
    applied: list[str] = []

    def applied_one(*, step: Any, **_: Any) -> None:
        if step.is_upgrade:
            applied.append(step.up_revision_id)
            log.info("migration %s applied: %s", step.up_revision_id, step.up_revision.doc)

    cfg = alembic_config(url)
    cfg.attributes["on_version_apply"] = applied_one
    command.upgrade(cfg, revision)
    return applied
