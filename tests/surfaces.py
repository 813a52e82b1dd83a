"""A recording ReplySurface and a fake clock for testing the core without a platform."""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field

from bot.messages import MessageGone, RetryLater, SurfaceLimits


class FakeClock:
    """Virtual time: sleepers wake only when the test advances the clock past their deadline."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._order = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._order += 1
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), self._order, future))
        await future

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        target = self.now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, future = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            if not future.done():
                future.set_result(None)
            await self.settle()
        self.now = target
        await self.settle()

    async def run_until(self, awaitable, step: float = 0.05, limit: float = 600.0):
        """Drive virtual time until `awaitable` completes."""
        task = asyncio.ensure_future(awaitable)
        spent = 0.0
        while not task.done():
            if spent > limit:
                task.cancel()
                raise AssertionError(f"did not finish within {limit} virtual seconds")
            await self.advance(step)
            spent += step
        return task.result()


@dataclass
class Write:
    at: float
    op: str  # post | edit
    message: int
    text: str
    phase: str


@dataclass
class RecordingSurface:
    """Keeps every message's current text, like a platform would; can fail on demand."""

    max_length: int = 4096
    interval: float = 1.0
    clock: object = None
    messages: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    fail_next: list[Exception] = field(default_factory=list)
    typing_calls: int = 0

    @property
    def limits(self) -> SurfaceLimits:
        return SurfaceLimits(self.max_length, self.interval)

    def _now(self) -> float:
        return self.clock() if self.clock else 0.0

    def _check(self, text: str) -> None:
        if self.fail_next:
            raise self.fail_next.pop(0)
        assert text, "platforms reject empty messages"
        assert len(text) <= self.max_length, f"message of {len(text)} characters exceeds {self.max_length}"

    async def post(self, text: str, *, phase: str) -> int:
        self._check(text)
        self.messages.append(text)
        self.phases.append(phase)
        self.writes.append(Write(self._now(), "post", len(self.messages) - 1, text, phase))
        return len(self.messages) - 1

    async def edit(self, handle: int, text: str, *, phase: str) -> None:
        self._check(text)
        if self.messages[handle] is None:
            raise MessageGone()
        self.messages[handle] = text
        self.phases[handle] = phase
        self.writes.append(Write(self._now(), "edit", handle, text, phase))

    async def typing(self) -> None:
        self.typing_calls += 1

    def delete(self, handle: int) -> None:
        self.messages[handle] = None

    @property
    def visible(self) -> str:
        return "\n".join(m for m in self.messages if m)


def retry_later(seconds: float) -> RetryLater:
    return RetryLater(seconds)


class PictureRecorder:
    """A responder for the picture persona that records what reached it (instead of a model):
    the question, the attachment as the adapter declared it, and the picture the core took in."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None, str, str, int]] = []

    async def respond(self, turn):
        image, picture = turn.msg.image, turn.picture
        if image is None:  # a follow-up question about the picture
            yield "follow-up"
            return
        self.seen.append((turn.text, image.size, image.mime_type, picture.prepared.source_format, picture.prepared.source_bytes))
        yield f"got {picture.prepared.source_bytes} bytes"


def tiny_picture(fmt: str = "PNG") -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(out, fmt)
    return out.getvalue()
