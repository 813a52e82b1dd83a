"""Telegram's flood limits, kept by the bot itself so that it never meets a 429.

Telegram allows about one message per second per chat, twenty per minute per group and thirty
per second for the whole bot, edits included, and counts a request when it *arrives*: somewhere
between our sending it and our receiving its answer. So:

- per chat, a write may start `interval + MARGIN` after the previous write to that chat
  completed (was accepted), and never while one is in flight. Counting from when a write
  started let a few milliseconds of network jitter put two arrivals less than a second apart;
- overall, a write holds a place in the budget from when it starts until WINDOW after it
  completed, so whenever it arrived, no WINDOW at Telegram sees more writes than the budget;
- when the overall budget is short, complete messages go first, then the streaming chat whose
  text has waited longest (a chat that has not written yet waited longest: first text before
  other chats' edits), so more concurrent answers mean fewer edits each, never a 429;
- status lines (queue position, model loading) go only while no text waits for the budget, and
  the typing indicator uses only spare budget: neither ever delays answer text.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable

PRIVATE_INTERVAL = 1.0  # seconds between two writes in one private chat
GROUP_INTERVAL = 3.0  # 20 per minute in a group
MARGIN = 0.05  # seconds added to every per-chat interval: Telegram's counting is not exact
WINDOW = 1.0  # the overall limit is counted per second
STREAM_BUDGET = 27  # streaming edits per second, all chats together (Telegram: ~30)
FINAL_BUDGET = 28  # complete messages may use more of the overall budget
SPARE_BUDGET = 12  # typing indicators go only while fewer writes than this count


@dataclass
class PacingStats:
    """Counters for logs and metrics (read them, never reset them)."""

    writes: int = 0  # writes started (sendMessage, editMessageText)
    deferred: int = 0  # streaming edits told to come back later (the stream then sends newer text)
    waited: int = 0  # complete messages that waited for their slot
    rate_limited: int = 0  # 429s Telegram answered anyway
    typing: int = 0  # typing indicators sent
    typing_skipped: int = 0  # typing indicators left out for lack of spare budget


class Slot:
    """One write's place: in its chat until it completed, in the overall budget until WINDOW
    after that (the request may reach Telegram any time between its start and its answer)."""

    __slots__ = ("chat", "interval", "done_at")

    def __init__(self, chat: str | None, interval: float) -> None:
        self.chat = chat
        self.interval = interval
        self.done_at: float | None = None  # None while the request is in flight


class Pacer:
    """Shared by all replies of one bot."""

    STALE = 1.5  # a streaming chat that has not asked again for this long no longer queues

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.clock = clock
        self.sleep = sleep
        self.stats = PacingStats()
        self._chat_free: dict[str, float] = {}  # chat -> when its next write may start
        self._in_flight: dict[str, int] = {}  # chat -> writes not yet answered
        self._last: dict[str, float] = {}  # chat -> when it last got a slot
        self._slots: deque[Slot] = deque()  # the writes that may still count overall
        self._queued: dict[str, tuple[float, float]] = {}  # streaming chat -> (last write, last asked)
        self._finals_waiting = 0

    # -- reading the state -----------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Writes are waiting for the overall budget."""
        fresh = self.clock() - self.STALE
        return bool(self._finals_waiting) or any(asked >= fresh for _, asked in self._queued.values())

    def _counting(self, now: float) -> list[float | None]:
        while self._slots and self._slots[0].done_at is not None and self._slots[0].done_at <= now - WINDOW:
            self._slots.popleft()
        return [s.done_at for s in self._slots if s.done_at is None or s.done_at > now - WINDOW]

    def _chat_wait(self, chat: str | None, now: float) -> float:
        if chat is None:
            return 0.0
        if self._in_flight.get(chat):  # at least a whole interval after it completes
            return PRIVATE_INTERVAL + MARGIN
        return max(0.0, self._chat_free.get(chat, 0.0) - now)

    def wait_for(self, chat: str | None, budget: int) -> float:
        """Seconds until this chat's spacing and the overall budget may allow a write (0: now)."""
        now = self.clock()
        wait = self._chat_wait(chat, now)
        counting = self._counting(now)
        if len(counting) >= budget:
            done = sorted(at for at in counting if at is not None)
            excess = len(counting) - budget  # this many must leave the window first
            wait = max(wait, done[excess] + WINDOW - now if excess < len(done) else 0.05)
        return wait

    # -- taking and giving back slots ------------------------------------------------------
    def try_take(
        self, chat: str | None, interval: float, budget: int, *, queue: bool = False, status: bool = False,
    ) -> Slot | None:
        """A slot for a write now, or None when this chat or the overall budget is busy.
        `queue`: a streaming edit, which yields to complete messages and to chats waiting longer.
        `status`: a status line, which goes only while no text is waiting."""
        now = self.clock()
        if status and self.busy:
            self.stats.deferred += 1
            return None
        if self.wait_for(chat, budget) > 0 or (queue and not self._my_turn(chat, budget, now)):
            if queue:
                self.stats.deferred += 1
                if chat is not None and self._chat_wait(chat, now) <= 0:
                    self._queued[chat] = (self._last.get(chat, 0.0), now)
            return None
        return self._grant(chat, interval, now)

    def _grant(self, chat: str | None, interval: float, now: float) -> Slot:
        slot = Slot(chat, interval)
        self._slots.append(slot)
        self.stats.writes += 1
        if chat is not None:
            self._queued.pop(chat, None)
            self._last[chat] = now
            self._in_flight[chat] = self._in_flight.get(chat, 0) + 1
            if len(self._last) > 10_000:  # forget chats that have been quiet for a minute
                self._last = {c: at for c, at in self._last.items() if at > now - 60 or self._in_flight.get(c)}
                self._chat_free = {c: at for c, at in self._chat_free.items() if at > now}
        return slot

    def _my_turn(self, chat: str | None, budget: int, now: float) -> bool:
        if self._finals_waiting:
            return False
        free = budget - len(self._counting(now))
        mine = self._last.get(chat, 0.0)
        for other, (last, asked) in list(self._queued.items()):
            if asked < now - self.STALE:
                del self._queued[other]
            elif other != chat and last < mine:
                free -= 1
        return free > 0

    async def take(self, chat: str | None, interval: float, budget: int) -> Slot:
        """Wait for a slot (complete messages: they go before streaming edits)."""
        if chat is not None:
            self._queued.pop(chat, None)
        self._finals_waiting += 1
        try:
            if (slot := self.try_take(chat, interval, budget)) is None:
                self.stats.waited += 1
            while slot is None:
                await self.sleep(max(0.01, self.wait_for(chat, budget)))
                slot = self.try_take(chat, interval, budget)
            return slot
        finally:
            self._finals_waiting -= 1

    def try_spare(self) -> Slot | None:
        """A slot for something cosmetic (the typing indicator), only from spare budget."""
        now = self.clock()
        if self.busy or len(self._counting(now)) >= SPARE_BUDGET:
            self.stats.typing_skipped += 1
            return None
        self.stats.typing += 1
        slot = Slot(None, 0.0)
        self._slots.append(slot)
        return slot

    def release(self, slot: Slot, *, wrote: bool = True) -> None:
        """The request completed (accepted, refused or failed). `wrote=False`: refused without
        effect, so the chat may write again at once."""
        now = slot.done_at = self.clock()
        chat = slot.chat
        if chat is None:
            return
        left = self._in_flight.get(chat, 1) - 1
        if left > 0:
            self._in_flight[chat] = left
        else:
            self._in_flight.pop(chat, None)
        if wrote:
            self._chat_free[chat] = max(self._chat_free.get(chat, 0.0), now + slot.interval + MARGIN)

    def hold(self, chat: str, seconds: float) -> None:
        """Telegram said retry_after: no write to this chat until then."""
        self.stats.rate_limited += 1
        self._chat_free[chat] = max(self._chat_free.get(chat, 0.0), self.clock() + seconds)
