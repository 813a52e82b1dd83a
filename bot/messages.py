"""The contract between adapters and the core.

An adapter turns a platform event into an `Incoming` value and hands the core a
`ReplySurface`: the few operations the core needs to show one answer (post a message,
edit it, render the final text). Nothing here knows about Telegram or Discord.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Literal, Protocol

from .i18n import lang_of


@dataclass(frozen=True)
class ImageAttachment:
    """An image the user sent. `fetch` downloads the bytes only when the core wants them,
    after it has checked `size` (the platform's declared size; None when unknown)."""

    fetch: Callable[[], Awaitable[bytes]]
    size: int | None = None
    filename: str = ""
    mime_type: str = ""


@dataclass(frozen=True)
class Incoming:
    """One user action, platform-neutral.

    `command` is set when the platform parsed a command itself (Discord slash commands);
    otherwise a text starting with "/" is parsed by the core. `text` holds the rest.
    """

    platform: str  # "console", "telegram", "discord", ...
    chat_id: str
    user_id: str
    text: str = ""
    command: str | None = None
    thread_id: str | None = None  # forum topic / Discord thread: a separate conversation
    guild_id: str | None = None  # Discord server, for allowlists
    is_group: bool = False
    language: str | None = None  # the user's language code on the platform ("zh-hans", "en")
    user_name: str = ""
    image: ImageAttachment | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # adapter-private data, ignored by the core

    @property
    def lang(self) -> str:
        """The language the bot answers this user in ("en" or "zh"): the one recipe for it."""
        return lang_of(self.language)


@dataclass(frozen=True)
class ReplyContext:
    """What a surface may show besides the answer, given by the core (surfaces never ask the App).

    The core sets `surface.context` before the first write of every reply: for a notice the
    user's language and current persona, for an answer the persona that answers."""

    lang: str  # "en" or "zh"
    persona: str  # the answering persona's title in `lang` ("InternLM", "猪八戒")
    persona_name: str  # its stable name ("internlm", "bajie")


@dataclass(frozen=True)
class SurfaceLimits:
    max_length: int  # characters per message
    min_edit_interval: float  # seconds between two edits of the same conversation's reply


class RetryLater(Exception):
    """The platform asked us to slow down (HTTP 429). The stream waits and sends the newest text."""

    def __init__(self, seconds: float):
        super().__init__(f"retry after {seconds:.1f}s")
        self.seconds = float(seconds)


class MessageGone(Exception):
    """The message being edited no longer exists (deleted by the user, expired token)."""


Phase = Literal["status", "streaming", "sealed", "done", "notice"]
"""What a write means, so the adapter can pick markup and buttons:
- "status": a placeholder shown before the answer starts (queue position, model loading);
  the same message is then edited into the answer; show a Stop control.
- "streaming": partial answer; plain text; show a Stop control.
- "sealed": this message is complete but the answer continues in a new message; render markup.
- "done": the answer is complete; render markup; show a Regenerate control.
- "notice": a standalone reply of the bot (help, errors, confirmations); render markup, no controls.
"""


class ReplySurface(Protocol):
    """Where one answer is shown. Implemented by each adapter, one instance per incoming action.

    `post` creates a new message and returns an opaque handle; `edit` replaces the text of a
    message it created. Rendering markup must fall back to plain text by itself: a write must
    never be lost because of markup. Errors: raise `RetryLater` for rate limits and
    `MessageGone` when the message cannot be edited any more; anything else is logged by the
    core and retried on the next write.
    """

    limits: SurfaceLimits
    context: ReplyContext | None  # set by the core before the first write (see ReplyContext)

    async def post(self, text: str, *, phase: Phase) -> Any: ...

    async def edit(self, handle: Any, text: str, *, phase: Phase) -> None: ...

    async def typing(self) -> None:
        """Show "typing…"; called about every 4.5 s until the first text is visible."""
