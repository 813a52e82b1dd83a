"""Where to cut a text that is longer than one platform message.

Prefer a paragraph break, then a line break, then the end of a sentence, then a space; never
leave a code fence open across messages: it is closed at the cut and reopened (with its
language) at the start of the next message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})([^\n`]*)$", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?。！？；;]['\")”’）]*\s*")
_RESERVE = 16  # room for the closing fence


@dataclass(frozen=True)
class Split:
    head: str  # the text of the full message, fence closed if needed
    consumed: int  # how many characters of the input the head covers
    reopen: str  # what the next message starts with ("" or an opening fence line)


def open_fence(text: str) -> str | None:
    """The opening line of the fence still open at the end of `text`, if any."""
    opening: tuple[str, str] | None = None  # (marker, info)
    for match in _FENCE.finditer(text):
        marker, info = match.group(1), match.group(2).strip()
        if opening is None:
            opening = (marker, info)
        elif not info and marker[0] == opening[0][0] and len(marker) >= len(opening[0]):
            opening = None
    return None if opening is None else opening[0] + opening[1]


def split(text: str, limit: int, *, start: int = 0) -> Split:
    """Cut `text` (longer than `limit`) into a head of at most `limit` characters.

    `start` is where the cut may begin at the earliest (after a reopened fence prefix), so
    every call makes progress.
    """
    if len(text) <= limit:
        return Split(text, len(text), "")
    window_end = max(start + 1, limit - _RESERVE)
    cut = _best_cut(text, start, window_end)
    head = text[:cut]
    fence = open_fence(head)
    if fence is None:
        return Split(head.rstrip(), cut, "")
    closer = _marker(fence)
    head = head.rstrip("\n") + "\n" + closer
    return Split(head, cut, fence + "\n")


def _marker(fence_line: str) -> str:
    char = fence_line[0]
    return char * (len(fence_line) - len(fence_line.lstrip(char)))


def _best_cut(text: str, start: int, end: int) -> int:
    window = text[start:end]
    floor = len(window) // 3  # do not make tiny messages just to honour a boundary
    for pattern in ("\n\n", "\n"):
        at = window.rfind(pattern)
        if at >= floor:
            return start + at + len(pattern)
    sentences = [m.end() for m in _SENTENCE_END.finditer(window)]
    if sentences and sentences[-1] >= floor:
        return start + sentences[-1]
    at = window.rfind(" ")
    if at >= floor:
        return start + at + 1
    return end
