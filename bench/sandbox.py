"""How fast the agent's sandbox starts: `print(1)` in a fresh bubblewrap sandbox.

    .venv/bin/python bench/sandbox.py [--runs 40] [--workers 2]

Prints the median (and p90) time of one run, one after another, and the runs per second with
N concurrent workers. Goal on the reference machine (2 CPU cores): median <= 150 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.sandbox import Sandbox, SandboxLimits  # noqa: E402


async def main(runs: int, workers: int) -> None:
    sandbox = Sandbox(SandboxLimits(), max_concurrent=max(4, workers))
    if sandbox.problem:
        sys.exit(f"sandbox unavailable: {sandbox.problem}")
    await sandbox.run("print(1)")  # warm the page cache
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await sandbox.run("print(1)")
        times.append(time.perf_counter() - started)
        assert result.output == "1\n", result
    times.sort()
    median = statistics.median(times)
    p90 = times[int(len(times) * 0.9) - 1]
    print(f"sequential: median {median * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms over {runs} runs "
          f"(goal <= 150 ms: {'met' if median <= 0.150 else 'MISSED'})")

    queue: asyncio.Queue = asyncio.Queue()
    for _ in range(runs):
        queue.put_nowait(None)

    async def worker() -> None:
        while not queue.empty():
            queue.get_nowait()
            assert (await sandbox.run("print(1)")).output == "1\n"

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - started
    print(f"{workers} workers: {runs / elapsed:.1f} runs/s ({runs} runs in {elapsed:.2f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.workers))
