"""After a crash: tell the users whose answers were cut.

While an answer streams, the core stores where it is shown (the platform's reference for its
last message, which part of the answer that message holds, the user's language). Rows still
"streaming" at start-up become "interrupted" (store.py); once an adapter is up, it is handed
each of its interrupted answers with the text to show: what was saved of that message plus the
interrupted mark. The adapter edits the message (Stop button gone, Regenerate offered). Where
that is no longer possible (a deleted message, an expired Discord interaction token), it is
logged and skipped; either way the answer is not tried again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from .i18n import t
from .messages import RetryLater
from .store import HistoryStore, StorageError

log = logging.getLogger(__name__)

ATTEMPTS = 3  # per message, through the platform's rate limits

Repair = Callable[[dict, str, str, int], Awaitable[None]]
"""repair(message reference, text, language, answer id): edit that message into `text` with a
Regenerate button for that answer and no Stop button; raise (MessageGone, anything) when that
cannot be done."""


def reference(platform: str, lang: str, message: dict, base: int, prefix: str) -> str:
    return json.dumps({"platform": platform, "lang": lang, "base": base, "prefix": prefix, "message": message})


def interrupted_text(content: str, ref: dict, limit: int) -> str:
    """The last message's part of the saved answer, with the interrupted mark, within `limit`."""
    mark = t("interrupted_mark", ref.get("lang", "en"))
    body = (ref.get("prefix", "") + content[int(ref.get("base", 0)) :]).rstrip()
    if not body.strip():
        return mark
    room = limit - len(mark) - 2
    if len(body) > room:
        body = body[: room - 1].rstrip() + "…"
    return f"{body}\n\n{mark}"


async def recover(store: HistoryStore, platform: str, repair: Repair, limit: int) -> int:
    """Mark this platform's interrupted answers; returns how many messages were edited."""
    edited = 0
    for answer_id, content, raw in store.interrupted_references():
        try:
            ref = json.loads(raw)
        except ValueError:
            ref = {}
        if ref.get("platform") != platform:
            continue
        if await _repair_one(ref, interrupted_text(content, ref, limit), repair, platform, answer_id):
            edited += 1
        try:
            store.set_reference(answer_id, None)  # done, or never possible: not tried again
        except StorageError as exc:
            log.warning("could not note that answer %d was handled: %s", answer_id, exc)
    if edited:
        log.info("%s: marked %d answer(s) cut by the last crash", platform, edited)
    return edited


async def _repair_one(ref: dict[str, Any], text: str, repair: Repair, platform: str, answer_id: int) -> bool:
    for _ in range(ATTEMPTS):
        try:
            await repair(ref["message"], text, ref.get("lang", "en"), answer_id)
            return True
        except RetryLater as exc:
            await asyncio.sleep(exc.seconds)
        except Exception as exc:
            log.info("%s: could not mark an interrupted answer (%s: %s); moving on", platform, type(exc).__name__, exc)
            return False
    log.info("%s: could not mark an interrupted answer (rate-limited); moving on", platform)
    return False
