"""Migrations create exactly the schema the code declares, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic import command

from strongroom.store.migrate import alembic_config


def test_migrations_at_head_match_the_declared_tables(database_url: str) -> None:
    # `alembic check` fails if autogenerate finds any difference between the migrated database
    # (the session's, migrated to head by the fixture) and the tables the domains declare.
    command.check(alembic_config(database_url))
