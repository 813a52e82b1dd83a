"""Markdown → Telegram text + entities, for the messages that are complete.

Streaming edits are plain text (half-written Markdown would flicker and can be invalid); a
sealed or finished message is rendered with telegramify-markdown, which produces entities
(bold, code, pre with language, links, lists as bullets) instead of MarkdownV2/HTML markup, so
escaping can never break a message. Anything unusual falls back to the plain text.
"""

from __future__ import annotations

import logging

import telegramify_markdown
from telegram import MessageEntity

log = logging.getLogger(__name__)

MAX_LENGTH = 4096  # characters per message, after entities are taken out


def utf16_len(text: str) -> int:
    return telegramify_markdown.utf16_len(text)


def render(markdown: str) -> tuple[str, list[MessageEntity]]:
    """(text, entities) for `markdown`; (markdown, []) when it cannot be rendered well."""
    try:
        text, entities = telegramify_markdown.convert(markdown)
    except Exception as exc:  # a converter bug must never cost a message
        log.warning("markdown rendering failed, sending plain text: %r", exc)
        return markdown, []
    text = text.rstrip()
    if not text.strip() or len(text) > MAX_LENGTH:
        return markdown, []
    size = utf16_len(text)
    out = []
    for entity in entities:
        length = min(entity.length, size - entity.offset)  # the trailing whitespace was trimmed
        if length <= 0 or entity.offset < 0:
            continue
        out.append(MessageEntity(entity.type, entity.offset, length, url=entity.url, language=entity.language))
    return text, out
