"""Every domain's tables, imported so that the shared MetaData is complete (for Alembic)."""

from strongroom.auth import tables as _auth  # noqa: F401
from strongroom.connectors.sandbox import tables as _sandbox  # noqa: F401
from strongroom.events import tables as _events  # noqa: F401
from strongroom.idempotency import tables as _idempotency  # noqa: F401
from strongroom.ledger import tables as _ledger  # noqa: F401
from strongroom.payments import tables as _payments  # noqa: F401
from strongroom.payments import tokens as _tokens  # noqa: F401
from strongroom.store.metadata import metadata
from strongroom.vault import relay_tables as _vault_relay  # noqa: F401
from strongroom.vault import tables as _vault  # noqa: F401
from strongroom.worker import tables as _worker  # noqa: F401

__all__ = ["metadata"]
