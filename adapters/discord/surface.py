"""Where an answer is shown on Discord: the ReplySurface for slash commands and for messages.

- Slash commands (and the Regenerate button) answer through the interaction: the deferred
  "thinking…" response is edited into the answer (`edit_original_response`), continuations are
  follow-ups. The interaction token dies after 15 minutes, so after `switch_after` (14 min) every
  further write goes to normal channel messages instead.
- Mentions and DMs reply to the user's message and then edit that reply.
- The first message of an answer carries a one-line header naming the persona that answers (the
  core says which in `context`; surfaces never ask the App); `LIMITS.max_length` leaves room for
  it under Discord's 2000 characters.
- Stop (while streaming) and Regenerate (when done) are stateless buttons (`DynamicItem`s): their
  custom_id holds the asker's id, so they keep working after a restart and cost no memory.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import discord

from bot.i18n import t
from bot.messages import AnswerTag, Incoming, MessageGone, Phase, ReplyContext, RetryLater, SurfaceLimits
from bot.splitting import split

from . import texts  # noqa: F401  (registers the texts)
from .pacing import RETRY, Kind, Pacer, within

log = logging.getLogger(__name__)

DISCORD_MAX = 2000
HEADER_RESERVE = 40  # "-# " + a persona title of at most 32 characters + newline
LIMITS = SurfaceLimits(max_length=DISCORD_MAX - HEADER_RESERVE, min_edit_interval=1.0)  # channels: 5 writes / 5 s
# An interaction token allows 5 requests / 2 s: a little over one edit a second, spaced from completion
INTERACTION_LIMITS = SurfaceLimits(max_length=DISCORD_MAX - HEADER_RESERVE, min_edit_interval=0.8)
GONE_CODES = {10003, 10008, 10015, 10062, 50027}  # unknown channel/message/webhook/interaction, dead token


def persona_header(title: str) -> str:
    """Subtext line naming who answers (Discord renders "-# " as small grey text)."""
    return f"-# {title[:32]}\n"


# -- buttons ---------------------------------------------------------------------------------------


class OwnedButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"internlm:(?P<action>stop|regen):(?P<owner>\d+)(?::(?P<which>\w+))?",
):
    """A button only the asker may press; its custom_id says which action, whose answer and
    which answer (Stop: the answer's ticket, also while queued; Regenerate: the stored answer)."""

    def __init__(self, action: str, owner: int, lang: str = "en", which: str | None = None) -> None:
        stop = action == "stop"
        super().__init__(discord.ui.Button(
            style=discord.ButtonStyle.secondary if stop else discord.ButtonStyle.primary,
            label=t("discord_button_stop" if stop else "discord_button_regenerate", lang),
            emoji="⏹" if stop else "🔄",
            custom_id=f"internlm:{action}:{owner}" + (f":{which}" if which else ""),
        ))
        self.action, self.owner, self.which = action, owner, which

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]) -> "OwnedButton":
        button = cls(match["action"], int(match["owner"]), which=match["which"])
        button.item.label = item.label  # keep the label the asker saw
        return button

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self.owner:
            return True
        log.info("refused a %s button press by %s (not the asker)", self.action, interaction.user.id)
        adapter: DiscordAdapter = interaction.client.adapter  # type: ignore[attr-defined]
        note = t("discord_not_yours", str(interaction.locale))
        await adapter._urgently(lambda: interaction.response.send_message(note, ephemeral=True))
        return False

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.client.adapter.on_button(interaction, self.action, self.which)  # type: ignore[attr-defined]


def button_for(phase: Phase) -> str | None:
    """Stop while the answer runs, Regenerate when it is done, nothing otherwise."""
    return {"status": "stop", "streaming": "stop", "done": "regen"}.get(phase)


def controls(action: str | None, owner: int, lang: str, tag: AnswerTag | None = None) -> discord.ui.View | None:
    if action is None:
        return None
    which = None
    if tag is not None:
        if action == "regen" and tag.answer_id is None:
            return None  # stopped while queued: nothing was asked, nothing to regenerate
        which = tag.stop if action == "stop" else str(tag.answer_id)
    view = discord.ui.View(timeout=None)
    view.add_item(OwnedButton(action, owner, lang, which))
    return view


# -- surfaces ----------------------------------------------------------------------------------------


@dataclass
class Posted:
    """The handle the core gets back for one Discord message."""

    kind: str  # "original" | "followup" | "channel"
    message: Any = None  # discord.Message / WebhookMessage (None for the original response)
    header: str = ""  # the persona header this message starts with
    controls: str | None = None  # the button it shows now: "stop", "regen" or None


KINDS: dict[str, Kind] = {"status": "status", "streaming": "streaming"}  # everything else: "final"


def _translate(exc: discord.HTTPException) -> Exception:
    if isinstance(exc, discord.RateLimited):
        return RetryLater(exc.retry_after)
    if exc.status == 429:
        return RetryLater(1.0)
    if isinstance(exc, discord.NotFound) or exc.code in GONE_CODES:
        return MessageGone(str(exc))
    return exc


class _Surface:
    limits = LIMITS

    def __init__(self, incoming: Incoming, owner: int, pacer: Pacer) -> None:
        self.incoming = incoming
        self.owner = owner
        self.pacer = pacer  # the adapter's: every write takes its place there
        self.context: ReplyContext | None = None  # set by the core before the first write
        self.writes = 0
        self._header_used = False
        self.tag: AnswerTag | None = None  # names this answer in its buttons

    def bind(self, tag: AnswerTag) -> None:
        self.tag = tag

    # -- the ReplySurface protocol ----------------------------------------------------------------
    async def post(self, text: str, *, phase: Phase) -> Posted:
        if phase == "notice" and len(text) > DISCORD_MAX:  # the core does not split notices
            first = None
            while text:
                part = split(text, DISCORD_MAX)
                handle = await self._post(Posted("?"), part.head, phase)
                first = first or handle
                text = part.reopen + text[part.consumed :].lstrip("\n")
            return first  # type: ignore[return-value]
        header = ""
        if phase != "notice" and not self._header_used:
            header, self._header_used = self._header(), True
        return await self._post(Posted("?", header=header), text, phase)

    async def edit(self, handle: Posted, text: str, *, phase: Phase) -> None:
        content = handle.header + text
        wanted = button_for(phase)
        kwargs: dict[str, Any] = {"content": content}
        if wanted != handle.controls:  # send components only when the button changes
            kwargs["view"] = controls(wanted, self.owner, self.lang, self.tag)
        try:
            await self._paced(phase, self._scope(handle), lambda: self._edit(handle, **kwargs))
        except discord.HTTPException as exc:
            raise _translate(exc) from exc
        handle.controls = wanted
        self.writes += 1

    async def typing(self) -> None:
        pass

    async def _paced(self, phase: Phase, scope: str | None, request: Callable[[], Awaitable[Any]]) -> Any:
        """Run one write in its place in the adapter's budgets (see pacing.py)."""
        pacer = self.pacer
        kind = KINDS.get(phase, "final")
        if kind == "final":
            slot = await pacer.take(scope, kind)
        else:
            slot = pacer.try_take(scope, kind, answer=str(id(self)))
            if slot is None:  # the stream comes back with its newest text
                raise RetryLater(max(RETRY, pacer.wait_for(scope, kind)))
        try:
            return await within(slot, pacer, request)
        except discord.HTTPException as exc:
            if exc.status == 429:
                pacer.stats.rate_limited += 1
            raise

    def _scope(self, handle: Posted | None) -> str | None:
        """The bucket a write to `handle` (None: a new message) falls in."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------
    @property
    def lang(self) -> str:
        return self.context.lang if self.context is not None else self.incoming.lang

    def _header(self) -> str:
        return persona_header(self.context.persona) if self.context is not None else ""

    async def _post(self, handle: Posted, text: str, phase: Phase) -> Posted:
        content = handle.header + text
        wanted = button_for(phase)
        try:
            view = controls(wanted, self.owner, self.lang, self.tag)
            await self._paced(phase, self._scope(None), lambda: self._create(handle, content, view))
        except discord.HTTPException as exc:
            raise _translate(exc) from exc
        handle.controls = wanted
        self.writes += 1
        return handle

    async def _create(self, handle: Posted, content: str, view: discord.ui.View | None) -> None:
        raise NotImplementedError

    async def _edit(self, handle: Posted, **kwargs: Any) -> None:
        await handle.message.edit(**kwargs)


def _view_kwargs(view: discord.ui.View | None) -> dict[str, Any]:
    return {"view": view} if view is not None else {}


def channel_reference(handle: Posted, owner: int) -> dict | None:
    if handle.message is None:
        return None
    return {"kind": "channel", "channel": handle.message.channel.id, "message": handle.message.id,
            "owner": owner, "header": handle.header}


class MessageSurface(_Surface):
    """Answers a mention or DM: reply to the user's message, then edit the reply."""

    def reference(self, handle: Posted) -> dict | None:
        """Enough to edit this message after a restart (bot/recovery.py)."""
        return channel_reference(handle, self.owner)

    def __init__(self, incoming: Incoming, message: discord.Message, pacer: Pacer) -> None:
        super().__init__(incoming, message.author.id, pacer)
        self.message = message

    async def _create(self, handle: Posted, content: str, view: discord.ui.View | None) -> None:
        handle.kind = "channel"
        if self.writes == 0:
            reference = self.message.to_reference(fail_if_not_exists=False)  # the question may be deleted
            handle.message = await self.message.channel.send(content, reference=reference, **_view_kwargs(view))
        else:
            handle.message = await self.message.channel.send(content, **_view_kwargs(view))

    def _scope(self, handle: Posted | None) -> str | None:
        return f"channel:{self.message.channel.id}"

    async def typing(self) -> None:
        slot = self.pacer.try_take(None, "status")  # cosmetic: spare budget only
        if slot is not None:
            await within(slot, self.pacer, self.message.channel.typing)


class InteractionSurface(_Surface):
    """Answers an application command (or a Regenerate press) through its interaction token."""

    limits = INTERACTION_LIMITS

    def __init__(
        self, incoming: Incoming, interaction: discord.Interaction, *,
        received_at: float, clock: Callable[[], float], switch_after: float, token_lifetime: float, pacer: Pacer,
    ) -> None:
        super().__init__(incoming, interaction.user.id, pacer)
        self.interaction = interaction
        self.clock = clock
        self.switch_at = received_at + switch_after  # from here on: channel messages
        self.expires_at = received_at + token_lifetime
        self.original_written = False
        self.token_dead = False
        self.received_wall = time.time() - (clock() - received_at)  # token age survives a restart

    def reference(self, handle: Posted) -> dict | None:
        """Enough to edit this message after a restart, while its token lives (bot/recovery.py)."""
        if handle.kind == "channel":
            return channel_reference(handle, self.owner)
        message = "@original" if handle.kind == "original" else str(handle.message.id)
        return {"kind": handle.kind, "app": self.interaction.application_id, "token": self.interaction.token,
                "at": self.received_wall, "message": message, "owner": self.owner, "header": handle.header}

    def _token_usable(self) -> bool:
        return not self.token_dead and self.clock() < self.switch_at

    def _scope(self, handle: Posted | None) -> str | None:
        if handle is None:  # a new message: as _create decides
            original = not self.original_written and not self.token_dead and self.clock() < self.expires_at
            by_token = original or self._token_usable()
        else:
            by_token = handle.kind != "channel"
        return f"token:{self.interaction.id}" if by_token else f"channel:{self.interaction.channel_id}"

    async def _create(self, handle: Posted, content: str, view: discord.ui.View | None) -> None:
        interaction = self.interaction
        if not self.original_written and not self.token_dead and self.clock() < self.expires_at:
            handle.kind = "original"  # the deferred "thinking…" message becomes the answer
            try:
                await interaction.edit_original_response(content=content, **_view_kwargs(view))
            except discord.HTTPException as exc:
                self._note_dead(exc)
                raise
            self.original_written = True
        elif self._token_usable():
            handle.kind = "followup"
            try:
                handle.message = await interaction.followup.send(content, wait=True, **_view_kwargs(view))
            except discord.HTTPException as exc:
                self._note_dead(exc)
                raise
        else:
            handle.kind = "channel"
            if interaction.channel is None:
                raise MessageGone("the interaction token expired and its channel is unknown")
            handle.message = await interaction.channel.send(content, **_view_kwargs(view))  # type: ignore[union-attr]

    async def _edit(self, handle: Posted, **kwargs: Any) -> None:
        if handle.kind == "channel":
            await handle.message.edit(**kwargs)
            return
        if not self._token_usable():
            await self._retire(handle)
            raise MessageGone("the interaction token is about to expire; continuing in a channel message")
        try:
            if handle.kind == "original":
                await self.interaction.edit_original_response(**kwargs)
            else:
                await handle.message.edit(**kwargs)
        except discord.HTTPException as exc:
            self._note_dead(exc)
            raise

    async def _retire(self, handle: Posted) -> None:
        """Take the buttons off a message we can no longer edit (while the token still works)."""
        if self.token_dead or self.clock() >= self.expires_at or handle.controls is None:
            return
        try:
            if handle.kind == "original":
                await self._paced("sealed", self._scope(handle), lambda: self.interaction.edit_original_response(view=None))
            else:
                await self._paced("sealed", self._scope(handle), lambda: handle.message.edit(view=None))
            handle.controls = None
        except discord.HTTPException as exc:
            log.info("could not retire a message before its token expired: %s", exc)

    def _note_dead(self, exc: discord.HTTPException) -> None:
        if exc.code == 50027 or (isinstance(exc, discord.NotFound) and exc.code in (10015, 10062)):
            self.token_dead = True

    async def close(self) -> None:
        """The core wrote nothing (e.g. a repeated refusal): remove the "thinking…" placeholder."""
        if self.writes == 0 and not self.token_dead and self.clock() < self.expires_at:
            try:
                await self._paced("notice", self._scope(None), self.interaction.delete_original_response)
            except discord.HTTPException as exc:
                log.info("could not remove an unanswered placeholder: %s", exc)
