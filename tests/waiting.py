"""Waiting for events in tests, never for a fixed time.

`until(predicate)` re-checks a condition each turn of the event loop (briefly yielding the CPU)
and has no deadline of its own: on a busy machine it simply takes longer. A test that really
hangs is ended by pytest-timeout (pyproject.toml), the one time limit of the suite."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


async def until(predicate: Callable[[], Any], poll: float = 0.01) -> Any:
    """Return `predicate()`'s first truthy value."""
    while not (value := predicate()):
        await asyncio.sleep(poll)
    return value
