"""The fair per-model queue."""

from __future__ import annotations

import asyncio

import pytest

from models.scheduler import FairScheduler


async def test_capacity_is_respected_and_order_is_round_robin_across_tenants():
    scheduler = FairScheduler(capacity=1)
    served: list[str] = []
    release = asyncio.Event()

    async def job(tenant: str, name: str, hold: asyncio.Event | None = None):
        async with scheduler.slot(tenant):
            served.append(name)
            assert scheduler.active <= 1
            if hold:
                await hold.wait()

    first = asyncio.create_task(job("alice", "a0", release))
    await asyncio.sleep(0)
    # alice floods the queue, then bob and carol ask once each
    tasks = [asyncio.create_task(job("alice", f"a{i}")) for i in range(1, 5)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(job("bob", "b1")), asyncio.create_task(job("carol", "c1"))]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *tasks)
    assert served == ["a0", "a1", "b1", "c1", "a2", "a3", "a4"]


async def test_positions_are_reported_and_updated():
    scheduler = FairScheduler(capacity=1)
    release = asyncio.Event()
    positions: dict[str, list[int]] = {"x": [], "y": []}

    async def holder():
        async with scheduler.slot("h"):
            await release.wait()

    async def waiter(name: str):
        async with scheduler.slot(name, positions[name].append):
            await asyncio.sleep(0)

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    x = asyncio.create_task(waiter("x"))
    await asyncio.sleep(0)
    y = asyncio.create_task(waiter("y"))
    await asyncio.sleep(0)
    assert positions == {"x": [1], "y": [2]}
    release.set()
    await asyncio.gather(h, x, y)
    assert positions["x"] == [1, 0]  # 0: running
    assert positions["y"] == [2, 1, 0]


async def test_cancelled_waiter_leaves_the_queue_and_others_move_up():
    scheduler = FairScheduler(capacity=1)
    release = asyncio.Event()
    seen: list[int] = []

    async def holder():
        async with scheduler.slot("h"):
            await release.wait()

    h = asyncio.create_task(holder())
    await asyncio.sleep(0)
    doomed = asyncio.create_task(scheduler.slot("d").__aenter__())
    await asyncio.sleep(0)

    async def patient():
        async with scheduler.slot("p", seen.append):
            pass

    p = asyncio.create_task(patient())
    await asyncio.sleep(0)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert scheduler.waiting == 1 and seen == [2, 1]
    release.set()
    await asyncio.gather(h, p)
    assert scheduler.active == 0 and scheduler.waiting == 0


async def test_two_slots_run_two_at_once():
    scheduler = FairScheduler(capacity=2)
    running = 0
    peak = 0

    async def job(tenant):
        nonlocal running, peak
        async with scheduler.slot(tenant):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(job(f"t{i % 3}") for i in range(9)))
    assert peak == 2 and scheduler.active == 0
