"""Calling a processor: a timeout is retried with the same request a bounded number of times,
with growing waits; any other failure is final at once; the caller gets the error, never a raise."""

from __future__ import annotations

import asyncio
import time

import pytest

from strongroom.connectors.base import Declined, ProcessorTimeout
from strongroom.payments import processing
from strongroom.settings import PaymentsSettings


class Flaky:
    """Answers after `failures` failed attempts; each failure is a hang past the timeout or the
    connector's own ProcessorTimeout, alternately."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            if len(self.calls) % 2:
                await asyncio.sleep(10)
            raise ProcessorTimeout("no answer")
        return "authorized"


def _settings(retry_max: int) -> PaymentsSettings:
    return PaymentsSettings(processor_retry_max=retry_max, processor_timeout_s=0.05)


async def test_an_answer_on_the_first_attempt_is_returned_without_waiting():
    fn = Flaky(0)
    assert await processing.call(_settings(2), "authorize", fn) == "authorized"
    assert len(fn.calls) == 1


@pytest.mark.parametrize("failures", [1, 2])
async def test_timeouts_are_retried_with_growing_waits_until_an_answer(failures):
    fn = Flaky(failures)
    assert await processing.call(_settings(2), "authorize", fn) == "authorized"
    assert len(fn.calls) == failures + 1
    gaps = [b - a for a, b in zip(fn.calls, fn.calls[1:], strict=False)]
    # The first attempt hangs into its 50 ms timeout, then waits 50 ms; the second fails at once,
    # then waits 100 ms.
    assert gaps[0] >= 0.1
    if failures == 2:
        assert gaps[1] >= 0.1


@pytest.mark.parametrize("retry_max", [0, 1, 3])
async def test_after_retry_max_retries_the_timeout_is_returned(retry_max):
    fn = Flaky(retry_max + 5)
    outcome = await processing.call(_settings(retry_max), "authorize", fn)
    assert isinstance(outcome, ProcessorTimeout)
    assert len(fn.calls) == retry_max + 1


async def test_a_decline_is_returned_at_once_and_never_retried():
    calls = 0

    async def decline() -> str:
        nonlocal calls
        calls += 1
        raise Declined("generic_decline", "Your card was declined.")

    outcome = await processing.call(_settings(2), "authorize", decline)
    assert isinstance(outcome, Declined)
    assert calls == 1
