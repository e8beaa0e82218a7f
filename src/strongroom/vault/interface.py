"""What the payments domain needs of the vault: the in-process `Vault`, or `RemoteVault` when the
vault runs as its own process (`strongroom vault serve`)."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from strongroom.sensitive import Secret
from strongroom.vault.service import StoredCard


class CardVault(Protocol):
    async def tokenize(
        self, conn: AsyncConnection, merchant_id: str, pan: Secret[str], cvc: Secret[str] | None
    ) -> StoredCard:
        """Store the card; return its random token and keyed fingerprint (never the PAN)."""

    def discard_cvc(self, merchant_id: str, token: str) -> None:
        """Forget the card's CVC (after the first authorization attempt)."""

    def close(self) -> None:
        """Drop key material held in memory."""
