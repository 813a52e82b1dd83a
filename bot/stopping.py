"""/stop takes effect for the user at once, even while the model cannot stop yet.

A model checks for /stop after each token it generates; before the first one it reads the whole
prompt (with a picture, 1,400+ positions: seconds on a GPU, minutes on a CPU). While nothing of
the answer is shown yet, `UntilStopped` ends the iteration as soon as the session's `stopped`
event is set, so the reply can be marked stopped right away; whatever the model produces after
that is never shown, and `drain()` waits for it to really let go. Once text is shown, deltas
flow as usual: the model stops within a token, and what follows a stop is the responder's own
closing (e.g. the agent's "the run was stopped").
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable


class UntilStopped:
    def __init__(self, deltas: AsyncIterator[str], stopped: asyncio.Event, armed: Callable[[], bool]) -> None:
        self.deltas = deltas
        self.stopped = stopped
        self.armed = armed  # True while a stop should end the iteration at once (nothing shown yet)
        self._next: asyncio.Future | None = None
        self.cut = False  # the iteration ended at a stop, before the answer's end

    def __aiter__(self) -> "UntilStopped":
        return self

    async def __anext__(self) -> str:
        if not self.armed():
            return await anext(self.deltas)
        if self.stopped.is_set():
            self.cut = True
            raise StopAsyncIteration
        self._next = asyncio.ensure_future(anext(self.deltas))
        stop = asyncio.ensure_future(self.stopped.wait())
        try:
            await asyncio.wait({self._next, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not self._next.done():  # stopped first: the model is still busy; drain() waits for it
            self.cut = True
            raise StopAsyncIteration
        step, self._next = self._next, None
        return step.result()  # StopAsyncIteration at the end, or the model's error

    async def drain(self) -> None:
        """Wait for a delta still being produced (then discarded), so the stream can be closed."""
        if self._next is not None:
            await asyncio.gather(self._next, return_exceptions=True)
            self._next = None
