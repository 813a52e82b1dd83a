"""Fair admission to a model: at most N generations at once, waiting requests served
round-robin across tenants (users), so one chatty user cannot starve the others.

Each waiter can watch its position ("2 ahead") through a callback, updated whenever the
queue changes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

log = logging.getLogger(__name__)

PositionCallback = Callable[[int], None]


@dataclass(eq=False)
class _Waiter:
    tenant: str
    future: asyncio.Future
    on_position: PositionCallback | None = None
    last_reported: int = field(default=-1)


class FairScheduler:
    def __init__(self, capacity: int = 1) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.active = 0
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # rotation order

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def service_order(self) -> list[_Waiter]:
        """Waiters in the order they will be admitted: one per tenant per round."""
        queues = [list(q) for q in self._queues.values()]
        order: list[_Waiter] = []
        depth = 0
        while True:
            row = [q[depth] for q in queues if len(q) > depth]
            if not row:
                return order
            order.extend(row)
            depth += 1

    @asynccontextmanager
    async def slot(self, tenant: str, on_position: PositionCallback | None = None) -> AsyncIterator[None]:
        if self.active < self.capacity and not self._queues:
            self.active += 1
        else:
            waiter = _Waiter(tenant, asyncio.get_running_loop().create_future(), on_position)
            self._queues.setdefault(tenant, deque()).append(waiter)
            self._report()
            try:
                await waiter.future  # the slot is handed over already counted in `active`
            except BaseException:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release()  # admitted and cancelled in the same tick: pass it on
                else:
                    self._remove(waiter)
                    self._report()
                raise
        try:
            if on_position:
                on_position(0)
            yield
        finally:
            self._release()

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.tenant]

    def _release(self) -> None:
        self.active -= 1
        while self._queues and self.active < self.capacity:
            tenant, queue = next(iter(self._queues.items()))
            waiter = queue.popleft()
            del self._queues[tenant]
            if queue:  # the tenant goes to the back of the rotation
                self._queues[tenant] = queue
            if waiter.future.done():
                continue
            self.active += 1
            waiter.future.set_result(None)
        self._report()

    def _report(self) -> None:
        for ahead, waiter in enumerate(self.service_order(), start=1):
            if waiter.on_position and waiter.last_reported != ahead:
                waiter.last_reported = ahead
                try:
                    waiter.on_position(ahead)
                except Exception:  # a display problem must never break admission
                    log.exception("queue position callback failed")
