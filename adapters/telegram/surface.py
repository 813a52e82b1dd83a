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
from bot.messages import MessageGone, Phase, RetryLater, SurfaceLimits

from .render import MAX_LENGTH, render

log = logging.getLogger(__name__)

PRIVATE_INTERVAL = 1.0  # seconds between two writes in one private chat
GROUP_INTERVAL = 3.0  # 20 per minute in a group
WINDOW = 1.0  # the overall limit is counted per second
STREAM_BUDGET = 24  # streaming edits per second, all chats together (Telegram: ~30)
FINAL_BUDGET = 28  # complete messages may use more of the overall budget
STREAMING_PHASES = ("status", "streaming")

# callback_data prefixes; the asker's user id follows, so only they can press the button
STOP, REGENERATE = "stop", "regen"


class Pacer:
    """Shared by all replies of one bot: per-chat spacing and the overall per-second budget."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.clock = clock
        self.sleep = sleep
        self._chat_free: dict[str, float] = {}  # chat -> when its next write may go
        self._recent: deque[float] = deque()  # times of the writes of the last WINDOW seconds
        self._all_free = 0.0  # after a global 429

    def _wait_for(self, chat_id: str | None, budget: int) -> float:
        now = self.clock()
        while self._recent and self._recent[0] <= now - WINDOW:
            self._recent.popleft()
        wait = max(0.0, self._all_free - now)
        if chat_id is not None:
            wait = max(wait, self._chat_free.get(chat_id, 0.0) - now)
        if len(self._recent) >= budget:
            wait = max(wait, self._recent[len(self._recent) - budget] + WINDOW - now)
        return wait

    def try_take(self, chat_id: str | None, interval: float, budget: int) -> float:
        """Take a slot now and return 0, or return the seconds until one is free."""
        wait = self._wait_for(chat_id, budget)
        if wait > 0:
            return wait
        now = self.clock()
        self._recent.append(now)
        if chat_id is not None:
            self._chat_free[chat_id] = now + interval
            if len(self._chat_free) > 10_000:  # forget chats whose slot is long free
                self._chat_free = {c: at for c, at in self._chat_free.items() if at > now}
        return 0.0

    async def take(self, chat_id: str | None, interval: float, budget: int) -> None:
        while (wait := self.try_take(chat_id, interval, budget)) > 0:
            await self.sleep(wait)

    def hold(self, chat_id: str, seconds: float) -> None:
        """Telegram said retry_after: no write to this chat until then."""
        self._chat_free[chat_id] = max(self._chat_free.get(chat_id, 0.0), self.clock() + seconds)


def retry_seconds(exc: RetryAfter) -> float:
    value = exc.retry_after
    return value.total_seconds() if hasattr(value, "total_seconds") else float(value)


class TelegramSurface:
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
                self.reply_to = None
            message = await self.bot.send_message(
                self.chat_id, body, entities=entities or None, reply_markup=self._keyboard(phase),
                message_thread_id=self.thread_id, reply_parameters=reply,
            )
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
        # Cosmetic: skipped when the overall budget is busy rather than delaying real text.
        if self.pacer.try_take(None, 0.0, STREAM_BUDGET) == 0:
            await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)

    # -- writing ---------------------------------------------------------------------
    async def _write(self, text: str, phase: Phase, request: Callable[[str, list], Awaitable]):
        chat = str(self.chat_id)
        if phase in STREAMING_PHASES:
            wait = self.pacer.try_take(chat, self.interval, STREAM_BUDGET)
            if wait > 0:  # the stream will come back with the newest text
                raise RetryLater(wait)
            return await self._call(request, text, [])
        body, entities = render(text)
        await self.pacer.take(chat, self.interval, FINAL_BUDGET)
        if body == text and not entities:
            return await self._call(request, text, [])
        try:
            return await self._call(request, body, entities)
        except BadRequest as exc:  # never lose a message to markup: send it plain
            log.warning("telegram rejected the formatted text (%s); sending plain text", exc.message)
            await self.pacer.take(chat, self.interval, FINAL_BUDGET)
            return await self._call(request, text, [])

    async def _call(self, request: Callable[[str, list], Awaitable], text: str, entities: list):
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
                raise MessageGone(exc.message) from None
            raise

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
