"""How fast the agent's sandbox starts: `print(1)` in a fresh bubblewrap sandbox.

    .venv/bin/python bench/sandbox.py [--runs 40] [--workers 2]

Prints the median (and p90) time of one run, one after another, and the runs per second with
N concurrent workers. Goal on the reference machine (2 CPU cores): median <= 150 ms.

Then the memory cap (issue 9, item 2): a run whose code forks 6 children that each try to hold
400 MB, against the run's cap (SANDBOX_MEMORY_MB, 512 by default): the run's peak memory (all
its processes, from its control group) must stay within the cap, where on the old per-process
limit it reached 2.4 GB.
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

SIX_TIMES_400_MB = """
import os, time
kids = []
for i in range(6):
    pid = os.fork()
    if pid == 0:
        try:
            data = b"x" * (400 << 20)
            print("holds", flush=True)
            time.sleep(3)
        except MemoryError:
            print("MemoryError", flush=True)
        os._exit(0)
    kids.append(pid)
print("exits", sorted(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in kids), flush=True)
"""


async def memory_cap(memory_mb: int) -> None:
    sandbox = Sandbox(SandboxLimits(memory_mb=memory_mb, wall_seconds=60, cpu_seconds=30))
    print(f"memory: {sandbox.memory_mode}")
    result = await sandbox.run(SIX_TIMES_400_MB)
    held = result.output.count("holds")
    exits = result.output.split("exits")[-1].strip()
    if result.peak_memory_bytes is not None:
        peak = result.peak_memory_bytes / 2**20
        verdict = "within" if peak <= memory_mb else "OVER"
        print(f"6 × 400 MB run: peak {peak:.0f} MB of all its processes against a cap of {memory_mb} MB ({verdict}); "
              f"outcome {result.outcome}; {held} child(ren) got to hold 400 MB; children's exits {exits}")
    else:
        each, processes = sandbox.limits.per_process(False)
        print(f"6 × 400 MB run (no memory controller): per process {each >> 20} MB × {processes} processes "
              f"≤ {memory_mb} MB; outcome {result.outcome}; {held} child(ren) got to hold 400 MB; exits {exits}")


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
    await memory_cap(512)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.workers))
