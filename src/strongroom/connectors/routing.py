"""Which connector serves a request. Test mode always goes to the sandbox: a test key can
never move live money."""

from __future__ import annotations

from strongroom.connectors.base import Connector
from strongroom.errors import PermissionDenied


class Router:
    def __init__(self, sandbox: Connector, live: Connector | None = None) -> None:
        self._sandbox = sandbox
        self._live = live

    def for_mode(self, livemode: bool) -> Connector:
        if not livemode:
            return self._sandbox
        if self._live is None:
            raise PermissionDenied(
                "Live mode is not enabled on this server: no live processor is configured.",
                code="livemode_not_enabled",
            )
        return self._live

    def by_name(self, name: str, livemode: bool) -> Connector:
        connector = self.for_mode(livemode)
        if connector.name != name:
            raise PermissionDenied(f"Connector {name} is not configured.", code="connector_unavailable")
        return connector
