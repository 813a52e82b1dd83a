"""Discord's rate limits, kept by the bot itself, so that a burst of answers meets no 429 and
status lines never crowd out answer text.

Discord allows about 50 requests per second for a whole bot and, per route bucket, 5 message
writes per 5 s in a channel and 5 requests per 2 s per interaction token. discord.py waits on a
bucket by itself (which would send stale text) and learns the overall limit only from a 429.
So every write takes a place first, in the overall budget and in its channel's or token's:

- urgent (acknowledging an interaction, due within 3 s) and final (complete messages, notices)
  wait for their place and go first;
- streaming (a partial answer) takes a place now or comes back later with newer text; when
  places are short, the answer that has waited longest goes next (one that has not written yet
  waited longest: a first text goes before other answers' edits);
- status (a queue position, "typing…") goes only from spare budget, while no text is waiting,
  and never takes a channel's or token's last places.

A request holds its place from when it starts until a window's length after it completed
(Discord counts it somewhere in between). Interaction routes (the acknowledgement, and the
webhook edits and follow-ups its token opens) take places only in their token's window: Discord
documents that "interaction endpoints are not bound to the bot's Global Rate Limit", and so a
burst of slash commands never waits behind, or crowds out, channel messages.
"""

from __future__ import annotations

import asyncio
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal

OVERALL = (48, 1.0)  # requests per second for the whole bot (Discord: 50)
CHANNEL = (5, 5.0)  # message writes per channel
TOKEN = (5, 2.0)  # requests per interaction token (webhook edits and follow-ups)
STREAM_BUDGET = 47  # of OVERALL: acknowledgements and finals waiting make streaming yield at once
STATUS_BUDGET = 30  # of OVERALL: status lines and typing only below this
STATUS_KEEP = 2  # places of a channel or token that a status line never takes
STALE = 1.5  # a streaming answer that has not asked again for this long no longer queues
RETRY = 0.1  # seconds before a streaming edit that yielded its turn asks again

Kind = Literal["urgent", "final", "streaming", "status"]
_HELD: ContextVar[bool] = ContextVar("discord_place_held", default=False)  # this request has its place


@dataclass
class PacingStats:
    """Counters for logs and metrics (read them, never reset them)."""

    requests: int = 0  # places taken
    deferred: int = 0  # streaming edits told to come back later (with newer text)
    status_skipped: int = 0  # status lines and typing left out for lack of spare budget
    waited: int = 0  # urgent and final writes that waited for their place
    rate_limited: int = 0  # 429s Discord answered anyway


class Slot:
    __slots__ = ("keys", "done_at")

    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = keys
        self.done_at: float | None = None  # None while the request is in flight


class Pacer:
    """Shared by all answers of one Discord adapter. `scope` names a write's bucket:
    "channel:<id>" (and the overall budget), "token:<interaction id>" (that token's window only),
    "interaction" (an acknowledgement: no window at all) or None (the overall budget only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.clock = clock
        self.sleep = sleep
        self.stats = PacingStats()
        self._slots: dict[str, list[Slot]] = {}  # key -> places that may still count
        self._last: dict[str, float] = {}  # streaming answer -> when it last got a place
        self._queued: dict[str, tuple[float, float]] = {}  # streaming answer -> (last place, last asked)
        self._waiting = 0  # urgent and final writes waiting

    # -- the windows ---------------------------------------------------------------------
    @staticmethod
    def _keys(scope: str | None) -> tuple[str, ...]:
        """The windows a write to `scope` counts in."""
        if scope is None:
            return ("overall",)
        if scope == "interaction":
            return ()
        return (scope,) if scope.startswith("token:") else ("overall", scope)

    @staticmethod
    def _limit(key: str) -> tuple[int, float]:
        if key == "overall":
            return OVERALL
        return CHANNEL if key.startswith("channel:") else TOKEN

    def _counting(self, key: str, now: float) -> list[Slot]:
        per = self._limit(key)[1]
        slots = [s for s in self._slots.get(key, ()) if s.done_at is None or s.done_at > now - per]
        if slots:
            self._slots[key] = slots
        else:
            self._slots.pop(key, None)
        return slots

    def _wait(self, key: str, allowed: int, now: float) -> float:
        counting = self._counting(key, now)
        if len(counting) < allowed:
            return 0.0
        per = self._limit(key)[1]
        done = sorted(s.done_at for s in counting if s.done_at is not None)
        excess = len(counting) - allowed
        return done[excess] + per - now if excess < len(done) else RETRY

    def _allowed(self, key: str, kind: Kind) -> int:
        limit = self._limit(key)[0]
        if key == "overall":
            return {"urgent": limit, "final": limit, "streaming": STREAM_BUDGET, "status": STATUS_BUDGET}[kind]
        return limit - STATUS_KEEP if kind == "status" else limit

    def wait_for(self, scope: str | None, kind: Kind) -> float:
        """Seconds until a write of this kind might find its places (0: now)."""
        now = self.clock()
        return max((self._wait(key, self._allowed(key, kind), now) for key in self._keys(scope)), default=0.0)

    @property
    def busy(self) -> bool:
        """Text is waiting for places."""
        fresh = self.clock() - STALE
        return bool(self._waiting) or any(asked >= fresh for _, asked in self._queued.values())

    # -- taking and giving back places ---------------------------------------------------------
    def try_take(self, scope: str | None, kind: Kind, answer: str | None = None) -> Slot | None:
        """A place now, or None. Streaming writes (`answer` names the answer) yield to waiting
        finals and to answers that waited longer; status writes go only when nothing waits."""
        now = self.clock()
        keys = self._keys(scope)
        shares_overall = "overall" in keys  # then it waits its turn there
        if kind == "status" and shares_overall and self.busy:
            self.stats.status_skipped += 1
            return None
        if self.wait_for(scope, kind) > 0 or (kind == "streaming" and shares_overall and not self._my_turn(answer, now)):
            if kind == "streaming":
                self.stats.deferred += 1
                if answer is not None and shares_overall:
                    self._queued[answer] = (self._last.get(answer, 0.0), now)
            elif kind == "status":
                self.stats.status_skipped += 1
            return None
        slot = Slot(keys)
        for key in slot.keys:
            self._slots.setdefault(key, []).append(slot)
        self.stats.requests += 1
        if self.stats.requests % 1000 == 0:  # forget channels and tokens that fell quiet
            for key in list(self._slots):
                self._counting(key, now)
        if answer is not None and shares_overall:
            self._queued.pop(answer, None)
            self._last[answer] = now
            if len(self._last) > 10_000:  # forget answers that have been quiet for a minute
                self._last = {a: at for a, at in self._last.items() if at > now - 60}
        return slot

    def _my_turn(self, answer: str | None, now: float) -> bool:
        if self._waiting:
            return False
        free = STREAM_BUDGET - len(self._counting("overall", now))
        mine = self._last.get(answer, 0.0) if answer is not None else 0.0
        for other, (last, asked) in list(self._queued.items()):
            if asked < now - STALE:
                del self._queued[other]
            elif other != answer and last < mine:
                free -= 1
        return free > 0

    async def take(self, scope: str | None, kind: Kind = "final") -> Slot:
        """Wait for a place (urgent and final writes)."""
        waits_overall = "overall" in self._keys(scope)  # streaming yields to it there
        self._waiting += waits_overall
        try:
            slot = self.try_take(scope, kind)
            if slot is None:
                self.stats.waited += 1
            while slot is None:
                await self.sleep(max(0.01, self.wait_for(scope, kind)))
                slot = self.try_take(scope, kind)
            return slot
        finally:
            self._waiting -= waits_overall

    def release(self, slot: Slot) -> None:
        slot.done_at = self.clock()


async def within(slot: Slot, pacer: Pacer, request: Callable[[], Awaitable[Any]]) -> Any:
    """Run a request in the place `slot` holds (and give the place back when it completes)."""
    held = _HELD.set(True)
    try:
        return await request()
    finally:
        _HELD.reset(held)
        pacer.release(slot)


def cover_other_requests(http: Any, pacer: Pacer) -> None:
    """Give every other REST request discord.py makes through the bot's HTTP client (logging
    in, syncing commands, anything internal) a place too, ahead of streaming, so the overall
    budget holds for the whole bot."""
    original = http.request

    async def request(route: Any, **options: Any) -> Any:
        if _HELD.get():
            return await original(route, **options)
        return await within(await pacer.take(None, "urgent"), pacer, lambda: original(route, **options))

    http.request = request
