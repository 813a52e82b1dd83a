"""Fair admission to a model: at most N generations at once (the batch size), and, when a
budget is set, only as many as the KV cache budget holds; waiting requests are served
round-robin across tenants (users), so one chatty user cannot starve the others.

Memory: each request declares a cost (the cache entries it may need: prompt + answer budget).
Rows of a batch are padded to the longest, so a batch of n requests can hold up to
n × (largest cost) entries; a request is admitted only if that stays within the budget (a
request alone is always admitted). Admission is in rotation order: when the next request does
not fit, later ones wait too, so a long request cannot be overtaken forever.

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
    cost: int = 0


class FairScheduler:
    def __init__(self, capacity: int = 1, budget: int | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.budget = budget  # KV cache entries; None: no memory limit
        self.active = 0
        self._costs: list[int] = []  # of the admitted requests
        self._queues: OrderedDict[str, deque[_Waiter]] = OrderedDict()  # rotation order

    def fits(self, cost: int) -> bool:
        if self.active >= self.capacity:
            return False
        if self.budget is None or not self._costs:
            return True
        return (len(self._costs) + 1) * max(max(self._costs), cost) <= self.budget

    @property
    def reserved(self) -> int:
        """Cache entries the admitted requests may take at most (padding included)."""
        return len(self._costs) * max(self._costs, default=0)

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
    async def slot(self, tenant: str, on_position: PositionCallback | None = None, cost: int = 0) -> AsyncIterator[None]:
        if not self._queues and self.fits(cost):
            self._admit(cost)
        else:
            waiter = _Waiter(tenant, asyncio.get_running_loop().create_future(), on_position, cost=cost)
            self._queues.setdefault(tenant, deque()).append(waiter)
            self._report()
            try:
                await waiter.future  # the slot is handed over already counted in `active`
            except BaseException:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(cost)  # admitted and cancelled in the same tick: pass it on
                else:
                    self._remove(waiter)
                    self._admit_waiters()  # the head may have been the one that did not fit
                raise
        try:
            if on_position:
                on_position(0)
            yield
        finally:
            self._release(cost)

    def _admit(self, cost: int) -> None:
        self.active += 1
        self._costs.append(cost)

    def _remove(self, waiter: _Waiter) -> None:
        queue = self._queues.get(waiter.tenant)
        if queue and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self._queues[waiter.tenant]

    def _release(self, cost: int) -> None:
        self.active -= 1
        self._costs.remove(cost)
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self._queues:
            tenant, queue = next(iter(self._queues.items()))
            waiter = queue[0]
            if not waiter.future.done() and not self.fits(waiter.cost):
                break
            queue.popleft()
            del self._queues[tenant]
            if queue:  # the tenant goes to the back of the rotation
                self._queues[tenant] = queue
            if waiter.future.done():
                continue
            self._admit(waiter.cost)
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
