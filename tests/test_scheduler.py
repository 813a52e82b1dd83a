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


async def test_kv_budget_holds_requests_back_with_their_position_and_admits_them_as_memory_frees():
    # Batch size 8, but the cache holds 300 entries: rows pad to the longest, so n requests
    # whose largest cost is c need n * c entries.
    scheduler = FairScheduler(capacity=8, budget=300)
    releases = {name: asyncio.Event() for name in ("a", "b", "c", "d")}
    admitted: list[str] = []
    positions: dict[str, list[int]] = {name: [] for name in releases}

    async def job(name: str, cost: int):
        async with scheduler.slot(name, positions[name].append, cost=cost):
            admitted.append(name)
            await releases[name].wait()

    tasks = [asyncio.create_task(job("a", 100))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(job("b", 100)))  # 2 * 100 fits
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(job("c", 120)))  # 3 * 120 = 360 > 300: waits
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(job("d", 10)))  # would fit, but waits its turn behind c
    await asyncio.sleep(0)
    assert admitted == ["a", "b"] and scheduler.reserved == 200
    assert positions["c"] == [1] and positions["d"] == [2]
    releases["a"].set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert admitted == ["a", "b", "c"]  # 2 * 120 = 240 fits; d then needs 3 * 120 = 360
    assert positions["d"] == [2, 1] and scheduler.waiting == 1
    releases["b"].set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert admitted == ["a", "b", "c", "d"]
    releases["c"].set()
    releases["d"].set()
    await asyncio.gather(*tasks)
    assert scheduler.active == 0 and scheduler.reserved == 0


async def test_a_request_larger_than_the_budget_still_runs_alone():
    scheduler = FairScheduler(capacity=4, budget=100)
    async with scheduler.slot("big", cost=500):
        assert scheduler.active == 1
    assert scheduler.reserved == 0
