"""Engine, transactions and migrations. No domain logic lives here."""

from strongroom.store.db import Database, insert_ignore, utcnow
from strongroom.store.metadata import metadata

__all__ = ["Database", "insert_ignore", "metadata", "utcnow"]
