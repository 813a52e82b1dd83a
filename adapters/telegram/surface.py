"""The core's ReplySurface on Telegram: sendMessage, then editMessageText, within the flood limits.

Telegram allows about one write per second per chat, twenty per minute per group and thirty
per second overall, and answers more with 429 + retry_after. python-telegram-bot's
AIORateLimiter enforces the overall and per-group limits by *delaying* requests, which would
send text that is stale by the time it goes out. So the adapter paces writes itself before
taking the text: a streaming edit that has no free slot raises `RetryLater`, and the core's
ReplyStream sends the newest text when the slot comes. Complete messages (sealed, done,
notices) wait for their slot instead, and have a larger share of the overall budget, so a
finished answer is never starved by other chats' streaming. The rules are in pacing.py.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable

from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, RetryAfter

from bot.i18n import t
from bot.messages import MessageGone, Phase, ReplyContext, RetryLater, SurfaceLimits

from .pacing import FINAL_BUDGET, GROUP_INTERVAL, MARGIN, PRIVATE_INTERVAL, STREAM_BUDGET, Pacer, Slot
from .render import MAX_LENGTH, render

log = logging.getLogger(__name__)

STREAMING_PHASES = ("status", "streaming")
QUEUED_RETRY = 0.1  # seconds before a streaming edit that yielded its turn asks again

# callback_data prefixes; the asker's user id follows, so only they can press the button
STOP, REGENERATE = "stop", "regen"


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
        # the stream's own spacing (from a write's completion) matches the pacer's
        self.limits = SurfaceLimits(max_length=MAX_LENGTH, min_edit_interval=self.interval + MARGIN)

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
        # A chat action is not a message and only cosmetic: it takes spare overall budget
        # (AIORateLimiter counts it too) and is left out while text waits for the budget.
        slot = self.pacer.try_spare()
        if slot is None:
            return
        try:
            await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING, message_thread_id=self.thread_id)
        finally:
            self.pacer.release(slot)

    # -- writing ---------------------------------------------------------------------
    async def _write(self, text: str, phase: Phase, request: Callable[[str, list], Awaitable]):
        chat = str(self.chat_id)
        if phase in STREAMING_PHASES:
            slot = self.pacer.try_take(chat, self.interval, STREAM_BUDGET, queue=True, status=phase == "status")
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
        wrote = True
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
                wrote = False  # nothing was written: repost at once
                raise MessageGone(exc.message) from None
            raise
        finally:
            self.pacer.release(slot, wrote=wrote)

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
