"""Telegram updates → the core's `Incoming` values.

Private chats: every message is for the bot. Groups and supergroups: only a message that
mentions the bot, replies to one of its messages, or is a command (a "/cmd@OtherBot" is for
another bot and ignored). Forum topics are separate conversations (`thread_id`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from telegram import Bot, CallbackQuery, Message, MessageEntity
from telegram.constants import ChatType
from telegram.error import TelegramError

from bot.messages import ImageAttachment, Incoming

log = logging.getLogger(__name__)

GROUP_TYPES = (ChatType.GROUP, ChatType.SUPERGROUP)
CONTENT = ("text", "caption", "photo", "document", "sticker", "voice", "video", "audio", "animation", "video_note")


class ImageDownloadFailed(Exception):
    """The image could not be fetched; the message never carries the file URL (it holds the token)."""


@dataclass(frozen=True)
class BotIdentity:
    id: int
    username: str  # without "@"


def _utf16(text: str) -> bytes:
    return text.encode("utf-16-le")


def _remove(text: str, spans: list[tuple[int, int]]) -> str:
    """Remove (offset, length) spans counted in UTF-16 code units, as Telegram counts them."""
    data = _utf16(text)
    space = " ".encode("utf-16-le")
    for offset, length in sorted(spans, reverse=True):
        before, after = data[: 2 * offset], data[2 * (offset + length) :]
        if before.endswith(space) and after.startswith(space):  # "hi @bot there" -> "hi there"
            after = after[2:]
        data = before + after
    return data.decode("utf-16-le").strip()


def _entity_text(text: str, entity: MessageEntity) -> str:
    return _utf16(text)[2 * entity.offset : 2 * (entity.offset + entity.length)].decode("utf-16-le")


def topic_of(message: Message) -> int | None:
    """The forum topic a message belongs to (None outside forum topics)."""
    return message.message_thread_id if message.is_topic_message else None


def is_group(message: Message) -> bool:
    return message.chat.type in GROUP_TYPES


def _replies_to_bot(message: Message, me: BotIdentity) -> bool:
    replied = message.reply_to_message
    if replied is None or replied.from_user is None or replied.from_user.id != me.id:
        return False
    # in a forum topic every message "replies" to the topic's first message
    return not (message.is_topic_message and replied.message_id == message.message_thread_id)


def incoming_from_message(message: Message, me: BotIdentity, bot: Bot) -> Incoming | None:
    """The user action in `message`, or None when it is not for this bot."""
    user = message.from_user
    if user is None or user.is_bot or not any(getattr(message, name) for name in CONTENT):
        return None  # service messages, channel posts, other bots
    text = message.text if message.text is not None else (message.caption or "")
    entities = list(message.entities if message.text is not None else message.caption_entities)
    group = is_group(message)
    command: str | None = None
    addressed = not group or _replies_to_bot(message, me)
    cut: list[tuple[int, int]] = []
    for entity in entities:
        if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            name, _, target = _entity_text(text, entity)[1:].partition("@")
            if target and target.lower() != me.username.lower():
                return None  # "/cmd@OtherBot"
            command, addressed = name.lower(), True
            cut.append((0, entity.length))
        elif entity.type == MessageEntity.MENTION and _entity_text(text, entity)[1:].lower() == me.username.lower():
            addressed = True
            cut.append((entity.offset, entity.length))
        elif entity.type == MessageEntity.TEXT_MENTION and entity.user and entity.user.id == me.id:
            addressed = True
            cut.append((entity.offset, entity.length))
    if not addressed:
        return None
    if cut:
        text = _remove(text, cut)
    return Incoming(
        platform="telegram",
        chat_id=str(message.chat.id),
        user_id=str(user.id),
        text=text,
        command=command,
        thread_id=str(topic_of(message)) if topic_of(message) else None,
        is_group=group,
        language=user.language_code,
        user_name=user.full_name or user.username or "",
        image=image_of(message, bot),
        extra={"message_id": message.message_id},
    )


def incoming_from_callback(query: CallbackQuery) -> Incoming | None:
    """The user action behind a button press (for Regenerate and the session key of Stop)."""
    message = query.message
    if message is None or not isinstance(message, Message):
        return None  # the message is too old to be accessible
    return Incoming(
        platform="telegram",
        chat_id=str(message.chat.id),
        user_id=str(query.from_user.id),
        thread_id=str(topic_of(message)) if topic_of(message) else None,
        is_group=is_group(message),
        language=query.from_user.language_code,
        user_name=query.from_user.full_name or "",
    )


def image_of(message: Message, bot: Bot) -> ImageAttachment | None:
    """A photo, or an image sent as a file; the bytes are fetched only if the core wants them."""
    if message.photo:
        largest = message.photo[-1]
        return _attachment(bot, largest.file_id, largest.file_size, "photo.jpg", "image/jpeg")
    document = message.document
    if document is not None and (document.mime_type or "").startswith("image/"):
        return _attachment(bot, document.file_id, document.file_size, document.file_name or "", document.mime_type or "")
    return None


def _attachment(bot: Bot, file_id: str, size: int | None, filename: str, mime_type: str) -> ImageAttachment:
    async def fetch() -> bytes:
        try:
            file = await bot.get_file(file_id)
            return bytes(await file.download_as_bytearray())
        except TelegramError as exc:
            # the message of a download error may contain the file URL, which contains the token
            log.warning("downloading an image from Telegram failed: %s", type(exc).__name__)
            raise ImageDownloadFailed(f"Telegram refused the download ({type(exc).__name__})") from None
        except Exception as exc:
            log.warning("downloading an image from Telegram failed: %s", type(exc).__name__)
            raise ImageDownloadFailed(f"the download failed ({type(exc).__name__})") from None

    return ImageAttachment(fetch=fetch, size=size, filename=filename, mime_type=mime_type)
