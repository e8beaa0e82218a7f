"""Periodic background jobs, shared by the api and the vault process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger(__name__)


async def every(interval_s: float, name: str, job: Callable[[], Awaitable[object]]) -> None:
    """Run `job` every `interval_s` until cancelled. A failed run is logged and retried next time:
    it must not kill the loop."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await job()
        except Exception as exc:  # a failed sweep must not kill the loop; it is logged and retried
            log.error("background.failed", job=name, error_type=type(exc).__name__)
