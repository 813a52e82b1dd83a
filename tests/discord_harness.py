"""Runs the real Discord adapter (real discord.py) against the fake Discord, in this event loop.

Used by tests/test_discord*.py and bench/discord_streaming.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import AsyncIterator, Callable

from adapters.discord import DiscordAdapter
from bot.app import App
from bot.messages import Incoming
from tests.fake_discord import FakeDiscord, Interaction, Message, patched

REGENERATE = "internlm:regen:"
STOP = "internlm:stop:"


@contextlib.asynccontextmanager
async def running(
    app: App, fake: FakeDiscord, *, clock: Callable[[], float] = time.monotonic, **adapter_options: object,
) -> AsyncIterator[DiscordAdapter]:
    """Start the adapter with `app` against `fake` (already started); stop it gracefully at the end."""
    await app.prepare()  # as the real start does
    with patched(fake):
        adapter_options.setdefault("guild_ready_timeout", 0.2)  # the fake sends its one guild at once
        adapter = DiscordAdapter(app, app.settings, clock=clock, **adapter_options)
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(stop))
        try:
            ready = asyncio.create_task(adapter.client.wait_until_ready())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()  # raises what stopped the adapter
                raise AssertionError("the adapter stopped before it was ready")
            yield adapter
        finally:
            stop.set()
            await task


def is_done(message: Message | None) -> bool:
    """The answer in this message is complete (it shows the Regenerate button)."""
    return message is not None and any(c.startswith(REGENERATE) for c in message.custom_ids)


def answer_text(messages: list[Message]) -> str:
    """The answer across its messages, without the persona header line."""
    parts = []
    for i, message in enumerate(messages):
        content = message.content
        if i == 0 and content.startswith("-# "):
            content = content.split("\n", 1)[1] if "\n" in content else ""
        parts.append(content)
    return "\n".join(parts)


@contextlib.asynccontextmanager
async def stack(make_app, fake: FakeDiscord | None = None, *, adapter_options: dict | None = None, **settings):
    """A fake Discord, an App on the tiny models and the Discord adapter connected to it."""
    fake = fake or FakeDiscord()
    async with fake:
        app = make_app(discord_bot_token=fake.token, **settings)
        async with running(app, fake, **(adapter_options or {})) as adapter:
            yield fake, app, adapter


def key_of(fake: FakeDiscord, user, channel) -> Incoming:
    """The Incoming the adapter builds for this user in this guild channel (for session keys)."""
    return Incoming(platform="discord", chat_id=str(channel.id), user_id=str(user.id), guild_id=str(fake.guild.id), is_group=True)


def done_answer(interaction: Interaction) -> bool:
    return bool(interaction.messages) and is_done(interaction.messages[-1])


async def until_done(fake: FakeDiscord, interaction: Interaction) -> list[Message]:
    await fake.wait_for(lambda: done_answer(interaction), f"/{interaction.name} to finish")
    return interaction.messages
