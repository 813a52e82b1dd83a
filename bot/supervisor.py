"""Keeps each adapter running: one that dies is restarted with backoff while the others serve.

An adapter's `run(stop)` returning means it is finished (the console at end of input); raising
means it died (a malformed platform event that its library could not parse, a lost
connection it could not recover) and a fresh adapter is started after a delay that doubles up
to a minute and starts over once an adapter has run for a while. Only `AdapterCannotRun` on
the first start (a rejected token) is final: nothing would change by retrying.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Protocol

from .messages import AdapterCannotRun

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0
MAX_DELAY = 60.0
HEALTHY_AFTER = 60.0  # an adapter that ran this long before dying restarts after FIRST_DELAY


class Adapter(Protocol):
    name: str

    def run(self, stop: asyncio.Event) -> Awaitable[None]: ...


async def supervise(
    name: str, make: Callable[[], Adapter], stop: asyncio.Event, *,
    first_delay: float = FIRST_DELAY, max_delay: float = MAX_DELAY, healthy_after: float = HEALTHY_AFTER,
    clock: Callable[[], float] = time.monotonic, on_failure: Callable[[str], None] | None = None,
) -> None:
    delay, starts = first_delay, 0
    while not stop.is_set():
        began = clock()
        starts += 1
        try:
            await make().run(stop)
            return
        except AdapterCannotRun as exc:
            if starts == 1:
                raise
            failure, trace = f"cannot run: {exc}", None
        except Exception as exc:
            failure, trace = f"died ({type(exc).__name__}: {exc})", exc
        if stop.is_set():
            return
        if clock() - began >= healthy_after:
            delay = first_delay
        log.error("%s adapter %s; restarting in %.0f s", name, failure, delay, exc_info=trace)
        if on_failure is not None:
            on_failure(failure)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except asyncio.TimeoutError:
            pass
        delay = min(delay * 2, max_delay)
