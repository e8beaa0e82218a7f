"""One flush at a time per event loop, the fullest lane first: the scheduler of group commit's
and group reads' statements (store.group, store.reads).

A payment waits on the database six times (its payment method, the intent's first commit, the
vault's card, the sandbox processor's record, the relay's audit, the final commit), each a lane
whose waiting units go as one statement. With a writer per lane, every lane sends its statement
as soon as it has one, so a worker's requests stay spread over the six lanes and each statement
carries a few of them. Moving in lock-step, the same requests all wait in the same lane and one
statement carries them all, and a statement's cost per payment falls with its size on both sides
(figures in docs/performance.md).

So lanes hand themselves to this scheduler instead. It lets the loop run while units keep
arriving (up to `_MAX_TURNS` turns, stopping at the first turn in which none arrived), then
flushes ONE lane: the fullest, or any whose first unit has waited `max_wait_s`. While that
statement is out, the other lanes fill; the requests it answers move on together and join the
next lane together, so a worker's requests form a convoy, at about half the transactions a
payment of a writer per lane.

A flush is awaited only up to `max_wait_s`: a slow one (a lock wait) then goes on in the
background and the next lane is flushed, so no lane of the process is held behind it; at most
`_MAX_IN_FLIGHT` flushes are out at once. A lane's flush settles its own units whatever happens
(store.group and store.reads retry failed batches unit by unit); if the scheduler stops
(shutdown) or a flush fails unexpectedly, the units it was to write are cancelled, never left
waiting.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger(__name__)

_MAX_TURNS = 16
_MAX_IN_FLIGHT = 4


@dataclass
class _Waiting:
    size: Callable[[], int]  # units waiting in the lane now
    flush: Callable[[], Awaitable[None]]  # takes the lane's units and settles each
    abort: Callable[[], None]  # cancels every unit of the lane (the flush will not run)
    since: float  # loop time of the lane's first waiting unit


@dataclass
class _Loop:
    """One event loop's lanes and task (futures and tasks belong to the loop that made them)."""

    waiting: dict[Hashable, _Waiting] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    in_flight: set[asyncio.Task[None]] = field(default_factory=set)


class FlushScheduler:
    def __init__(self, *, max_wait_s: float) -> None:
        self._max_wait_s = max_wait_s
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Loop] = weakref.WeakKeyDictionary()

    def ready(
        self,
        key: Hashable,
        size: Callable[[], int],
        flush: Callable[[], Awaitable[None]],
        abort: Callable[[], None],
    ) -> None:
        """The lane `key` has units waiting: it will be flushed once (a lane already waiting is
        not queued twice; its flush takes every unit it has by then)."""
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _Loop()
        if key not in state.waiting:
            state.waiting[key] = _Waiting(size, flush, abort, loop.time())
        state.wake.set()
        if state.task is None or state.task.done():
            state.task = loop.create_task(self._run(state))
            state.task.add_done_callback(lambda _: _abort_all(state))

    async def _run(self, state: _Loop) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not state.waiting:
                state.wake.clear()
                await state.wake.wait()
                continue
            await _gather(state)
            now = loop.time()
            overdue = [key for key, lane in state.waiting.items() if now - lane.since >= self._max_wait_s]
            key = overdue[0] if overdue else max(state.waiting, key=lambda k: state.waiting[k].size())
            lane = state.waiting.pop(key)
            flushing = loop.create_task(_flush(lane))
            state.in_flight.add(flushing)
            flushing.add_done_callback(state.in_flight.discard)
            # The convoy: the others fill while this one is out. Not for long, though.
            await asyncio.wait({flushing}, timeout=self._max_wait_s)
            while len(state.in_flight) >= _MAX_IN_FLIGHT:
                await asyncio.wait(state.in_flight, return_when=asyncio.FIRST_COMPLETED)


async def _gather(state: _Loop) -> None:
    """Let the loop run while units keep arriving: requests a few steps from their next
    statement join it (no timed wait; under load each turn runs other requests' work)."""
    seen = -1
    for _ in range(_MAX_TURNS):
        now = sum(lane.size() for lane in state.waiting.values())
        if now == seen:
            return
        seen = now
        await asyncio.sleep(0)


async def _flush(lane: _Waiting) -> None:
    try:
        await lane.flush()
    except Exception as exc:
        # A lane's flush settles its own units, failures included: this is a bug, made visible
        # (the error's type only: a message can quote a row's values), and no unit may hang on it.
        log.error("store.flush_failed", error=type(exc).__name__)
        lane.abort()


def _abort_all(state: _Loop) -> None:
    """The scheduler's task ended (cancelled at shutdown): no lane waits for it any more."""
    waiting, state.waiting = state.waiting, {}
    for lane in waiting.values():
        lane.abort()
