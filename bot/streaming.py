"""ReplyStream: shows a growing answer on a platform by editing messages.

Policy (platform-neutral; the adapter supplies the limits):
- never edit faster than `min_edit_interval`, counted from when the previous write completed
  (the platform counts arrivals, which network jitter moves); deltas that arrive meanwhile are
  coalesced, so a slow platform always receives the newest text;
- the first answer text takes the first free write: a status line (queue position, model
  loading) is written only once it has stood for STATUS_DELAY without text overtaking it, and
  "typing…" starts only after TYPING_DELAY without text;
- never send an identical edit;
- past `max_length`, seal the message at a good boundary (see splitting.py) and continue in a
  new one;
- `finish` always delivers the final text, retrying through rate limits and recreating a
  message the user deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .messages import MessageGone, Phase, ReplySurface, RetryLater
from .splitting import split

log = logging.getLogger(__name__)

TYPING_INTERVAL = 4.5  # "typing…" lasts 5 s on Telegram
TYPING_DELAY = 0.3  # no "typing…" for an answer whose text comes sooner
STATUS_DELAY = 0.5  # a status line that text overtakes this soon is never written
FINAL_ATTEMPTS = 6


@dataclass
class _Message:
    handle: Any = None
    shown: str | None = None  # what the platform shows now


class ReplyStream:
    def __init__(
        self,
        surface: ReplySurface,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.surface = surface
        self.limit = surface.limits.max_length
        self.interval = surface.limits.min_edit_interval
        self.clock = clock
        self.sleep = sleep
        self.text = ""  # the whole answer so far
        self.status = ""  # shown while there is no answer text yet
        self._status_at = 0.0  # when the status last changed
        self.sealed: list[_Message] = []
        self.current = _Message()
        self._base = 0  # where the current message starts in self.text
        self._prefix = ""  # a reopened code fence
        self._next_write = 0.0
        self._dirty = asyncio.Event()
        self._has_text = asyncio.Event()
        self._write_lock = asyncio.Lock()  # finish() never interrupts a write half-way
        self._closing = False
        self._flusher: asyncio.Task | None = None
        self._typing: asyncio.Task | None = None
        self.writes = 0
        self.retries_after = 0

    # -- feeding -------------------------------------------------------------------------
    def start(self) -> "ReplyStream":
        self._flusher = asyncio.create_task(self._flush_loop())
        self._typing = asyncio.create_task(self._typing_loop())
        return self

    def set_status(self, text: str) -> None:
        if not self.text and text != self.status:
            self.status = text
            self._status_at = self.clock()
            self._dirty.set()

    def feed(self, delta: str) -> None:
        if delta:
            self.text += delta
            self._has_text.set()
            self._dirty.set()

    @property
    def messages(self) -> int:
        return len(self.sealed) + (1 if self.current.handle is not None else 0)

    # -- background work -------------------------------------------------------------
    async def _sleep_until_text(self, seconds: float) -> None:
        """Sleep, but wake as soon as the first answer text arrives."""
        if self._has_text.is_set():
            return
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        waker = asyncio.ensure_future(self._has_text.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    async def _typing_loop(self) -> None:
        try:
            await self._sleep_until_text(TYPING_DELAY)
            while self.current.shown is None and not self.sealed and not self._closing and not self._has_text.is_set():
                try:
                    await self.surface.typing()
                except Exception as exc:  # purely cosmetic
                    log.debug("typing indicator failed: %r", exc)
                await self.sleep(TYPING_INTERVAL)
        except asyncio.CancelledError:
            pass

    async def _flush_loop(self) -> None:
        while not self._closing:
            await self._dirty.wait()
            if not self.text:  # only a status: let text overtake it
                status_wait = self._status_at + STATUS_DELAY - self.clock()
                if status_wait > 0:
                    await self._sleep_until_text(status_wait)
            wait = self._next_write - self.clock()
            if wait > 0:
                await self.sleep(wait)
            async with self._write_lock:
                if self._closing:
                    return
                self._dirty.clear()
                await self._write_safely()

    async def _write_safely(self) -> None:
        try:
            await self._write("streaming")
        except RetryLater as exc:
            self.retries_after += 1
            self._next_write = self.clock() + exc.seconds
            self._dirty.set()
        except Exception:  # an intermediate edit may fail; the final one is retried
            log.exception("streaming edit failed")
            self._next_write = self.clock() + max(self.interval, 1.0)

    # -- writing -------------------------------------------------------------------------
    def _body(self) -> str:
        if not self.text:
            return self.status
        return self._prefix + self.text[self._base :]

    async def _put(self, message: _Message, text: str, phase: Phase) -> None:
        if message.shown == text and phase == "streaming":
            return
        try:
            if message.handle is None:
                message.handle = await self.surface.post(text, phase=phase)
            else:
                await self.surface.edit(message.handle, text, phase=phase)
        except MessageGone:
            log.info("a reply message is gone; continuing in a new message")
            message.handle = message.shown = None  # a failed repost must not edit the gone one again
            message.handle = await self.surface.post(text, phase=phase)
        finally:  # the interval counts from the completed write
            self._next_write = self.clock() + self.interval
        self.writes += 1
        message.shown = text

    async def _write(self, phase: Phase) -> None:
        body = self._body()
        while len(body) > self.limit:  # seal full messages first, oldest text first
            part = split(body, self.limit, start=len(self._prefix))
            await self._put(self.current, part.head, "sealed")
            self.sealed.append(self.current)
            self.current = _Message()
            rest = self.text[self._base + part.consumed - len(self._prefix) :]
            self._base = len(self.text) - len(rest.lstrip("\n"))
            self._prefix = part.reopen
            body = self._body()
            if phase == "streaming":  # the next write waits for its turn
                self._dirty.set()
                return
            await self._pause()
        if body:
            await self._put(self.current, body, phase if self.text or phase == "done" else "status")

    async def _pause(self) -> None:
        wait = self._next_write - self.clock()
        if wait > 0:
            await self.sleep(wait)

    # -- finishing ---------------------------------------------------------------------
    async def finish(self, *, empty_text: str = "…") -> str:
        """Deliver the final text (once; later calls return at once). Returns the answer text."""
        if self._closing:
            return self.text
        self._closing = True
        self._dirty.set()
        async with self._write_lock:  # let a write in flight complete, then stop the loops
            for task in (self._typing, self._flusher):
                if task is not None and not task.done():
                    task.cancel()
        for task in (self._typing, self._flusher):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("stream task failed")
        if not self.text:
            self.status = empty_text
        for attempt in range(FINAL_ATTEMPTS):
            await self._pause()
            try:
                await self._write("done")
                return self.text
            except RetryLater as exc:
                self.retries_after += 1
                self._next_write = self.clock() + exc.seconds
            except Exception:
                log.exception("final delivery failed (attempt %d)", attempt + 1)
                self._next_write = self.clock() + min(2.0**attempt, 10.0)
        log.error("gave up delivering a final answer of %d characters", len(self.text))
        return self.text
