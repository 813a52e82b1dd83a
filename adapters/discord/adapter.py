"""The Discord adapter (discord.py): slash commands, mentions and DMs in, streamed answers out.

Read top to bottom: `run` logs in, syncs the commands when they changed, connects the gateway
and serves until `stop`; `on_command` defers at once and hands the command to the core;
`on_message` does the same for DMs and mentions; `on_button` serves Stop and Regenerate.
Everything about showing an answer is in surface.py, the commands in commands.py.

The bot needs no privileged intent: Discord delivers the text of DMs and of messages that
mention the bot without MESSAGE_CONTENT.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from typing import Any, Callable

import aiohttp
import discord

from bot.app import App
from bot.config import Settings
from bot.i18n import t
from bot.messages import AdapterCannotRun, AnswerTag, ImageAttachment, Incoming, MessageGone

from .api_calls import api_call_trace
from .commands import I18nTranslator, build_tree, sync_commands
from .pacing import Pacer, cover_other_requests, within
from .surface import DISCORD_MAX, HEADER_RESERVE, InteractionSurface, MessageSurface, OwnedButton, controls

log = logging.getLogger(__name__)

QUIET_COMMANDS = {"help", "reset", "stop", "persona"}  # answered ephemerally: only the user sees them
SURFACE_CLOSE_WAIT = 5.0  # seconds for answers' surfaces to close after the core drained them
_CJK = re.compile(r"[\u3400-\u9fff]")


class _Client(discord.Client):
    def __init__(self, adapter: "DiscordAdapter", **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter

    async def setup_hook(self) -> None:
        self.add_dynamic_items(OwnedButton)

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s (%s guilds)", self.user, len(self.guilds))
        self.adapter.app.health.adapter("discord", "connected")
        self.adapter.on_ready()

    async def on_resumed(self) -> None:
        self.adapter.app.health.adapter("discord", "connected")

    async def on_disconnect(self) -> None:
        if not self.adapter._closing:
            self.adapter.app.health.adapter("discord", "disconnected", "gateway connection lost; reconnecting")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)


class DiscordAdapter:
    name = "discord"

    def __init__(
        self, app: App, settings: Settings, *,
        clock: Callable[[], float] = time.monotonic,
        switch_after: float = 14 * 60.0,  # stop using the interaction token (it expires at 15 min)
        token_lifetime: float = 15 * 60.0,
        guild_ready_timeout: float = 2.0,  # discord.py's wait for the guild list after connecting
    ) -> None:
        self.app = app
        self.settings = settings
        self.clock = clock
        self.switch_after = switch_after
        self.token_lifetime = token_lifetime
        intents = discord.Intents.default()  # no privileged intents (see the module docstring)
        self.client = _Client(
            self, intents=intents, allowed_mentions=discord.AllowedMentions.none(),  # model text never pings
            guild_ready_timeout=guild_ready_timeout,
            http_trace=api_call_trace(lambda method, result: app.metrics.api_call("discord", method, result)),
        )
        self.tree = build_tree(self.client, self.app.menu(self.name), self.on_command)
        self.pacer = Pacer()  # every request of the bot takes its place here (pacing.py)
        cover_other_requests(self.client.http, self.pacer)
        self._running: set[asyncio.Task] = set()  # answers in flight, with their surface's closing
        self._closing = False
        self._recovery: asyncio.Task | None = None

    def _interaction_surface(self, incoming: Incoming, interaction: discord.Interaction, received: float) -> InteractionSurface:
        return InteractionSurface(
            incoming, interaction, received_at=received, clock=self.clock,
            switch_after=self.switch_after, token_lifetime=self.token_lifetime, pacer=self.pacer,
        )

    # -- lifecycle ------------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        token = self.settings.discord_bot_token.get_secret_value().strip()
        if not token:
            log.error("DISCORD_BOT_TOKEN is not set; the Discord adapter does not start")
            return
        await self.tree.set_translator(I18nTranslator())
        if not await self._login(token, stop):
            return
        try:
            await sync_commands(self.tree, self.client.application_id or 0, self.settings.discord_guild_ids, self.settings.data_dir)
        except Exception:  # the bot still works with the commands Discord already has
            log.exception("syncing the slash commands failed; continuing without")
        gateway = asyncio.create_task(self.client.connect(reconnect=True), name="discord-gateway")
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({gateway, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            await self._shutdown()
            if not gateway.done():
                gateway.cancel()
            try:
                await gateway
            except asyncio.CancelledError:
                pass
            except discord.PrivilegedIntentsRequired:
                raise AdapterCannotRun("Discord refused the requested intents") from None
        if not stop.is_set():  # the gateway ended by itself: the supervisor starts a fresh adapter
            raise ConnectionError("the Discord gateway connection ended")

    async def _login(self, token: str, stop: asyncio.Event) -> bool:
        """Log in, retrying while Discord cannot be reached; a rejected token is fatal."""
        delay = 1.0
        while not stop.is_set():
            try:
                await self.client.login(token)
                return True
            except discord.LoginFailure:
                await self.client.close()
                raise AdapterCannotRun("Discord rejected DISCORD_BOT_TOKEN (401); check the token in the developer portal") from None
            except (OSError, aiohttp.ClientError, discord.DiscordServerError, asyncio.TimeoutError) as exc:
                log.warning("cannot reach Discord to log in (%s); retrying in %.0f s", type(exc).__name__, delay)
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                delay = min(delay * 2, 60.0)
        await self.client.close()
        return False

    async def _shutdown(self) -> None:
        """Take no new work, let the core drain the answers in flight (its one shutdown policy),
        let their surfaces close, then close the connection."""
        self._closing = True
        self.app.health.adapter(self.name, "stopped")
        if self._recovery is not None and not self._recovery.done():
            self._recovery.cancel()
        await self.app.drain(self.name)
        if self._running:
            await asyncio.wait(set(self._running), timeout=SURFACE_CLOSE_WAIT)
        await self.client.close()
        log.info("Discord adapter stopped")

    # -- after a crash -------------------------------------------------------------------------------
    def on_ready(self) -> None:
        if self._recovery is None:  # once per adapter: on_ready comes again after reconnects
            self._recovery = asyncio.create_task(self.app.recover("discord", self._repair, DISCORD_MAX - HEADER_RESERVE))

    async def _repair(self, ref: dict, text: str, lang: str, answer_id: int) -> None:
        """Edit an answer cut by a crash: the interrupted mark, Regenerate instead of Stop."""
        content = ref.get("header", "") + text
        view = controls("regen", int(ref["owner"]), lang, AnswerTag(stop="", answer_id=answer_id))
        if ref["kind"] == "channel":
            channel = self.client.get_partial_messageable(int(ref["channel"]))
            await channel.get_partial_message(int(ref["message"])).edit(content=content, view=view)
            return
        if time.time() - float(ref["at"]) >= self.token_lifetime - 30:
            raise MessageGone("its interaction token has expired (15 minutes)")
        webhook = discord.Webhook.partial(int(ref["app"]), ref["token"], client=self.client)
        await webhook.edit_message(ref["message"], content=content, view=view)  # type: ignore[arg-type]

    async def _serve(self, incoming: Incoming, work: Any) -> None:
        """Run one answer, tracked for shutdown."""
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await work
        finally:
            self._running.discard(task)

    # -- turning Discord events into Incoming -------------------------------------------------------
    @staticmethod
    def _where(channel: Any, guild_id: int | None) -> tuple[str, str | None]:
        """(chat_id, thread_id): a thread is its own conversation inside its parent channel."""
        parent = getattr(channel, "parent_id", None)
        if isinstance(channel, discord.Thread) and parent:
            return str(parent), str(channel.id)
        return str(channel.id if channel is not None else 0), None

    def _from_interaction(self, interaction: discord.Interaction, command: str | None, text: str,
                          image: ImageAttachment | None = None) -> Incoming:
        chat_id, thread_id = self._where(interaction.channel, interaction.guild_id)
        user = interaction.user
        return Incoming(
            platform="discord", chat_id=chat_id, user_id=str(user.id), text=text, command=command,
            thread_id=thread_id, guild_id=str(interaction.guild_id) if interaction.guild_id else None,
            is_group=interaction.guild_id is not None, language=str(interaction.locale), user_name=user.name, image=image,
        )

    @staticmethod
    def _image(attachment: discord.Attachment) -> ImageAttachment:
        # `fetch` downloads only when the core asks, after it has checked `size`.
        return ImageAttachment(
            fetch=attachment.read, size=attachment.size, filename=attachment.filename,
            mime_type=attachment.content_type or "",
        )

    # -- slash commands ------------------------------------------------------------------------------
    async def on_command(self, interaction: discord.Interaction, command: str, text: str,
                         attachment: discord.Attachment | None = None) -> None:
        received = self.clock()
        if self._closing:
            return
        try:  # first, before anything that can wait: Discord allows 3 s
            await self._urgently(lambda: interaction.response.defer(thinking=True, ephemeral=command in QUIET_COMMANDS))
        except discord.HTTPException as exc:
            log.warning("could not defer /%s in time (%s); Discord shows it as failed", command, exc)
            return
        image = self._image(attachment) if attachment is not None else None
        incoming = self._from_interaction(interaction, command, text, image)
        surface = self._interaction_surface(incoming, interaction, received)
        await self._serve(incoming, self._answer(incoming, surface, self.app.handle))

    async def _urgently(self, request: Callable[[], Any]) -> Any:
        """Acknowledge an interaction (due within 3 s): not bound by the overall budget."""
        return await within(await self.pacer.take("interaction", "urgent"), self.pacer, request)

    async def _answer(self, incoming: Incoming, surface: InteractionSurface,
                      handler: Callable[[Incoming, Any], Any]) -> None:
        try:
            await handler(incoming, surface)
        finally:
            await surface.close()

    async def on_button(self, interaction: discord.Interaction, action: str, which: str | None = None) -> None:
        received = self.clock()
        incoming = self._from_interaction(interaction, None, "")
        if action == "stop":
            stopped = self.app.stop_for(incoming, which)
            if stopped:
                await self._urgently(interaction.response.defer)  # the answer itself shows "⏹ stopped"
            else:
                note = t("stop_nothing", incoming.language)
                await self._urgently(lambda: interaction.response.send_message(note, ephemeral=True))
            return
        if self._closing:
            return
        await self._urgently(lambda: interaction.response.defer(thinking=True))
        surface = self._interaction_surface(incoming, interaction, received)
        answer_id = int(which) if which and which.isdigit() else None
        regenerate = functools.partial(self.app.regenerate, answer_id=answer_id)
        await self._serve(incoming, self._answer(incoming, surface, regenerate))

    # -- mentions and DMs ------------------------------------------------------------------------------
    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if self._closing or me is None or message.author.bot or message.author.id == me.id:
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        is_dm = message.guild is None
        if not is_dm and not any(user.id == me.id for user in message.mentions):
            return  # in guilds the bot only answers when mentioned
        text = re.sub(rf"<@!?{me.id}>", "", message.content).strip()
        images = [a for a in message.attachments if (a.content_type or "").startswith("image/")]
        chat_id, thread_id = self._where(message.channel, message.guild.id if message.guild else None)
        incoming = Incoming(
            platform="discord", chat_id=chat_id, user_id=str(message.author.id), text=text, thread_id=thread_id,
            guild_id=str(message.guild.id) if message.guild else None, is_group=not is_dm,
            language=self._message_language(message, text), user_name=message.author.name,
            image=self._image(images[0]) if images else None,
        )
        await self._serve(incoming, self.app.handle(incoming, MessageSurface(incoming, message, self.pacer)))

    @staticmethod
    def _message_language(message: discord.Message, text: str) -> str | None:
        """Messages carry no locale: Chinese text gets Chinese replies, else the server's locale."""
        if _CJK.search(text):
            return "zh"
        return str(message.guild.preferred_locale) if message.guild else None
