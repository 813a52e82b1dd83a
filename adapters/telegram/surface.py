"""The core's ReplySurface on Telegram: sendMessage, then editMessageText, within the flood limits.

Telegram allows about one write per second per chat, twenty per minute per group and thirty
per second overall, and answers more with 429 + retry_after. python-telegram-bot's
AIORateLimiter enforces the overall and per-group limits by *delaying* requests, which would
send text that is stale by the time it goes out. So the adapter paces writes itself before
taking the text: a streaming edit that has no free slot raises `RetryLater`, and the core's
ReplyStream sends the newest text when the slot comes. Complete messages (sealed, done,
notices) wait for their slot instead, and have a larger share of the overall budget, so a
finished answer is never starved by other chats' streaming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Awaitable, Callable

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, RetryAfter

from bot.i18n import t
from bot.messages import MessageGone, Phase, ReplyContext, RetryLater, SurfaceLimits

from .render import MAX_LENGTH, render

log = logging.getLogger(__name__)

PRIVATE_INTERVAL = 1.0  # seconds between two writes in one private chat
GROUP_INTERVAL = 3.0  # 20 per minute in a group
WINDOW = 1.0  # the overall limit is counted per second
STREAM_BUDGET = 24  # streaming edits per second, all chats together (Telegram: ~30)
FINAL_BUDGET = 28  # complete messages may use more of the overall budget
STREAMING_PHASES = ("status", "streaming")
QUEUED_RETRY = 0.1  # seconds before a streaming edit that yielded its turn asks again

# callback_data prefixes; the asker's user id follows, so only they can press the button
STOP, REGENERATE = "stop", "regen"


class Slot:
    """One write's place in the overall budget: it counts from when it was taken until a
    second after its request completed, since the request may reach Telegram any time in
    between (a busy event loop or network delays requests, and Telegram counts arrivals)."""

    __slots__ = ("done_at",)

    def __init__(self) -> None:
        self.done_at: float | None = None  # None while the request is in flight


class Pacer:
    """Shared by all replies of one bot: per-chat spacing and the overall per-second budget.

    When the overall budget is short, it goes first to complete messages, then to the
    streaming chat whose text has waited longest, so no chat starves behind busier ones.
    """

    STALE = 1.5  # a streaming chat that has not asked again for this long no longer queues

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.clock = clock
        self.sleep = sleep
        self._chat_free: dict[str, float] = {}  # chat -> when its next write may go
        self._last: dict[str, float] = {}  # chat -> when it last got a slot
        self._slots: deque[Slot] = deque()  # the writes that may still count for the overall limit
        self._queued: dict[str, tuple[float, float]] = {}  # streaming chat -> (last write, last asked)
        self._finals_waiting = 0

    @property
    def busy(self) -> bool:
        """Writes are waiting for the overall budget."""
        fresh = self.clock() - self.STALE
        return bool(self._finals_waiting) or any(asked >= fresh for _, asked in self._queued.values())

    def _window(self, now: float) -> list[float | None]:
        while self._slots and self._slots[0].done_at is not None and self._slots[0].done_at <= now - WINDOW:
            self._slots.popleft()
        return [s.done_at for s in self._slots if s.done_at is None or s.done_at > now - WINDOW]

    def wait_for(self, chat_id: str | None, budget: int) -> float:
        """Seconds until this chat's spacing and the overall budget allow a write (0: now)."""
        now = self.clock()
        wait = max(0.0, self._chat_free.get(chat_id, 0.0) - now) if chat_id is not None else 0.0
        counting = self._window(now)
        if len(counting) >= budget:
            done = sorted(at for at in counting if at is not None)
            excess = len(counting) - budget  # this many must leave the window first
            wait = max(wait, done[excess] + WINDOW - now if excess < len(done) else 0.05)
        return wait

    def try_take(self, chat_id: str | None, interval: float, budget: int, *, queue: bool = False) -> Slot | None:
        """A slot for a write now, or None when this chat or the overall budget is busy.
        `queue`: a streaming edit, which yields to complete messages and to chats waiting longer."""
        now = self.clock()
        if self.wait_for(chat_id, budget) > 0 or (queue and not self._my_turn(chat_id, budget, now)):
            if queue and chat_id is not None and self._chat_free.get(chat_id, 0.0) <= now:
                self._queued[chat_id] = (self._last.get(chat_id, 0.0), now)
            return None
        slot = Slot()
        self._slots.append(slot)
        if chat_id is not None:
            self._queued.pop(chat_id, None)
            self._last[chat_id] = now
            self._chat_free[chat_id] = now + interval
            if len(self._chat_free) > 10_000:  # forget chats whose slot is long free
                self._chat_free = {c: at for c, at in self._chat_free.items() if at > now}
                self._last = {c: at for c, at in self._last.items() if at > now - 60}
        return slot

    def _my_turn(self, chat_id: str | None, budget: int, now: float) -> bool:
        if self._finals_waiting:
            return False
        free = budget - len(self._window(now))
        mine = self._last.get(chat_id, 0.0)
        for chat, (last, asked) in list(self._queued.items()):
            if asked < now - self.STALE:
                del self._queued[chat]
            elif chat != chat_id and last < mine:
                free -= 1
        return free > 0

    async def take(self, chat_id: str | None, interval: float, budget: int) -> Slot:
        """Wait for a slot (complete messages: they go before streaming edits)."""
        if chat_id is not None:
            self._queued.pop(chat_id, None)
        self._finals_waiting += 1
        try:
            while (slot := self.try_take(chat_id, interval, budget)) is None:
                await self.sleep(max(0.01, self.wait_for(chat_id, budget)))
            return slot
        finally:
            self._finals_waiting -= 1

    def release(self, slot: Slot) -> None:
        slot.done_at = self.clock()

    def refund(self, chat_id: str) -> None:
        """The write was refused without effect: the chat may write again now."""
        self._chat_free.pop(chat_id, None)

    def hold(self, chat_id: str, seconds: float) -> None:
        """Telegram said retry_after: no write to this chat until then."""
        self._chat_free[chat_id] = max(self._chat_free.get(chat_id, 0.0), self.clock() + seconds)


def retry_seconds(exc: RetryAfter) -> float:
    # `_retry_after` is the timedelta; the public attribute warns while PTB migrates its type
    value = getattr(exc, "_retry_after", None)
    if value is None:
        value = exc.retry_after
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


class TelegramSurface:
    context: ReplyContext | None = None  # set by the core; buttons use the language given at creation
    """One answer (or notice) in one chat; `handle` is the Telegram message id."""

    def __init__(
        self,
        bot: Bot,
        pacer: Pacer,
        chat_id: int | str,
        *,
        is_group: bool,
        owner_id: str,
        lang: str,
        thread_id: int | None = None,
        reply_to: int | None = None,
    ) -> None:
        self.bot = bot
        self.pacer = pacer
        self.chat_id = chat_id
        self.is_group = is_group
        self.owner_id = owner_id
        self.lang = lang
        self.thread_id = thread_id
        self.reply_to = reply_to  # in groups the first message answers the asker's message
        self.interval = GROUP_INTERVAL if is_group else PRIVATE_INTERVAL
        self.limits = SurfaceLimits(max_length=MAX_LENGTH, min_edit_interval=self.interval)

    # -- the ReplySurface protocol ----------------------------------------------------
    async def post(self, text: str, *, phase: Phase) -> int:
        async def send(body: str, entities: list) -> int:
            reply = None
            if self.reply_to is not None:
                reply = ReplyParameters(self.reply_to, allow_sending_without_reply=True)
            message = await self.bot.send_message(
                self.chat_id, body, entities=entities or None, reply_markup=self._keyboard(phase),
                message_thread_id=self.thread_id, reply_parameters=reply,
            )
            self.reply_to = None  # continuations follow the first message without quoting again
            return message.message_id

        return await self._write(text, phase, send)

    async def edit(self, handle: int, text: str, *, phase: Phase) -> None:
        async def change(body: str, entities: list) -> None:
            await self.bot.edit_message_text(
                body, chat_id=self.chat_id, message_id=handle, entities=entities or None,
                reply_markup=self._keyboard(phase),
            )

        await self._write(text, phase, change)

    async def typing(self) -> None:
        # A chat action is not a message (it is outside the message budget, and AIORateLimiter
        # still caps all requests); it is cosmetic, so skipped while text waits for the budget.
        if not self.pacer.busy:
            await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)

    # -- writing ---------------------------------------------------------------------
    async def _write(self, text: str, phase: Phase, request: Callable[[str, list], Awaitable]):
        chat = str(self.chat_id)
        if phase in STREAMING_PHASES:
            slot = self.pacer.try_take(chat, self.interval, STREAM_BUDGET, queue=True)
            if slot is None:  # the stream comes back with the newest text
                raise RetryLater(max(QUEUED_RETRY, self.pacer.wait_for(chat, STREAM_BUDGET)))
            return await self._call(slot, request, text, [])
        body, entities = render(text)
        slot = await self.pacer.take(chat, self.interval, FINAL_BUDGET)
        if body == text and not entities:
            return await self._call(slot, request, text, [])
        try:
            return await self._call(slot, request, body, entities)
        except BadRequest as exc:  # never lose a message to markup: send it plain
            log.warning("telegram rejected the formatted text (%s); sending plain text", exc.message)
            slot = await self.pacer.take(chat, self.interval, FINAL_BUDGET)
            return await self._call(slot, request, text, [])

    async def _call(self, slot: Slot, request: Callable[[str, list], Awaitable], text: str, entities: list):
        try:
            return await request(text, entities)
        except RetryAfter as exc:
            seconds = retry_seconds(exc)
            self.pacer.hold(str(self.chat_id), seconds)
            log.warning("telegram asked to retry after %.0f s (chat %s)", seconds, self.chat_id)
            raise RetryLater(seconds) from None
        except BadRequest as exc:
            problem = exc.message.lower()
            if "message is not modified" in problem:
                return None
            if "message to edit not found" in problem or "message_id_invalid" in problem or "message can't be edited" in problem:
                self.pacer.refund(str(self.chat_id))  # nothing was written: repost at once
                raise MessageGone(exc.message) from None
            raise
        finally:
            self.pacer.release(slot)

    def _keyboard(self, phase: Phase) -> InlineKeyboardMarkup | None:
        if phase in STREAMING_PHASES:
            button = InlineKeyboardButton(t("telegram_stop_button", self.lang), callback_data=f"{STOP}:{self.owner_id}")
        elif phase == "done":
            button = InlineKeyboardButton(
                t("telegram_regenerate_button", self.lang), callback_data=f"{REGENERATE}:{self.owner_id}"
            )
        else:
            return None
        return InlineKeyboardMarkup([[button]])
