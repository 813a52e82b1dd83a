"""Markdown → Telegram text + entities, for the messages that are complete.

Streaming edits are plain text (half-written Markdown would flicker and can be invalid); a
sealed or finished message is rendered with telegramify-markdown, which produces entities
(bold, code, pre with language, links, lists as bullets) instead of MarkdownV2/HTML markup, so
escaping can never break a message.

Every character the model wrote must survive the render (a model's `std::vector<int>` is not
HTML). Before converting, what CommonMark would swallow outside code is made literal: `<` (raw
HTML and autolinks) and `&` (character references) get a backslash, and math (`$…$`, `$$…$$`,
`\\(…\\)`, `\\[…\\]`) becomes a code span, shown as written rather than turned into Unicode. After
converting, a check compares the characters of the answer with those of the result (Markdown
syntax aside); anything missing, or anything unusual, falls back to the plain text.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

import pyromark
import telegramify_markdown
from telegram import MessageEntity
from telegramify_markdown import converter as _converter

log = logging.getLogger(__name__)

MAX_LENGTH = 4096  # characters per message, after entities are taken out
# The converter's own parser options (pinned telegramify-markdown 1.4.1), so the code and math
# regions found here are the ones it will see.
_OPTIONS = _converter.STANDARD_OPTIONS
# Characters Markdown syntax may turn into formatting (they may vanish from the rendered text).
_SYNTAX = set("*_~`#>|-+=:[]()!\\.")
_LIST_MARKER = re.compile(r"^[ \t>]*\d{1,9}[.)](?=[ \t])", re.MULTILINE)  # renumbered as "N."
_TEX_DELIMITED = re.compile(rb"\\\((?:.|\n)+?\\\)|\\\[(?:.|\n)+?\\\]")


def utf16_len(text: str) -> int:
    return telegramify_markdown.utf16_len(text)


def render(markdown: str) -> tuple[str, list[MessageEntity]]:
    """(text, entities) for `markdown`; (markdown, []) when it cannot be rendered losslessly."""
    try:
        text, entities = telegramify_markdown.convert(protect(markdown), latex_escape=False)
    except Exception as exc:  # a converter bug must never cost a message
        log.warning("markdown rendering failed, sending plain text: %r", exc)
        return markdown, []
    text = text.rstrip()
    if not text.strip() or len(text) > MAX_LENGTH:
        return markdown, []
    if missing := lost_characters(markdown, text, entities):
        log.info("markdown rendering would drop %r; sending plain text", "".join(sorted(missing))[:40])
        return markdown, []
    size = utf16_len(text)
    out = []
    for entity in entities:
        length = min(entity.length, size - entity.offset)  # the trailing whitespace was trimmed
        if length <= 0 or entity.offset < 0:
            continue
        out.append(MessageEntity(entity.type, entity.offset, length, url=entity.url, language=entity.language))
    return text, out


def protect(markdown: str) -> str:
    """`markdown` with `<` and `&` outside code escaped and math turned into code spans."""
    source = markdown.encode("utf-8")
    code, math = _regions(markdown)
    out, pos = bytearray(), 0
    for start, end, kind in sorted([(s, e, "code") for s, e in code] + [(s, e, "math") for s, e in math]):
        if start < pos:  # nested in a region already handled
            continue
        out += _literal(source[pos:start], out)
        out += source[start:end] if kind == "code" else _code_span(source[start:end])
        pos = end
    out += _literal(source[pos:], out)
    return out.decode("utf-8")


def _regions(markdown: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """UTF-8 byte ranges of code (spans and blocks) and of math, as the converter parses them."""
    code, math = [], []
    for payload, where in pyromark.events_with_range(markdown, options=_OPTIONS):
        if not isinstance(payload, dict):
            continue
        start = payload.get("Start")
        if "Code" in payload or (isinstance(start, dict) and "CodeBlock" in start):
            code.append((where["start"], where["end"]))
        elif "InlineMath" in payload or "DisplayMath" in payload:
            if not markdown.encode("utf-8")[where["end"]:where["end"] + 1].isdigit():  # "$10 and $20" are prices
                math.append((where["start"], where["end"]))
    source, taken = markdown.encode("utf-8"), sorted(code + math)
    for match in _TEX_DELIMITED.finditer(source):  # \( \) and \[ \] (CommonMark reads them as escapes)
        if not any(s < match.end() and match.start() < e for s, e in taken):
            math.append(match.span())
    return code, math


def _literal(chunk: bytes, before: bytearray) -> bytes:
    """Escape `<` and `&` in text outside code, unless a backslash already escapes them."""
    out = bytearray()
    for i, byte in enumerate(chunk):
        if byte in b"<&":
            preceding = (bytes(before[-64:]) + chunk[max(0, i - 64):i])[-64:]
            backslashes = len(preceding) - len(preceding.rstrip(b"\\"))
            if backslashes % 2 == 0:
                out += b"\\"
        out.append(byte)
    return bytes(out)


def _code_span(text: bytes) -> bytes:
    """`text` as an inline code span (shown exactly as written, in monospace)."""
    longest = max((len(run) for run in re.findall(rb"`+", text)), default=0)
    fence = b"`" * (longest + 1)
    pad = b" " if text.startswith(b"`") or text.endswith(b"`") else b""
    return fence + pad + text.replace(b"\n", b" ") + pad + fence


def lost_characters(markdown: str, text: str, entities) -> Counter:
    """Characters of `markdown` (Markdown syntax and white space aside) missing from the
    rendered `text` with its links' URLs and code blocks' languages."""
    rendered = text + "".join((e.url or "") + (e.language or "") for e in entities)
    wanted = Counter(c for c in _LIST_MARKER.sub("", markdown) if not c.isspace() and c not in _SYNTAX)
    have = Counter(c for c in _LIST_MARKER.sub("", rendered) if not c.isspace())
    return wanted - have
