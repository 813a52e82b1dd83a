"""Which adapters run: every platform with a token, else the console."""

from __future__ import annotations

import asyncio
from typing import Protocol

from bot.app import App
from bot.config import Settings


class Adapter(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or, for the console, end of input)."""


def create_adapters(app: App, settings: Settings, platforms: list[str]) -> list[Adapter]:
    adapters: list[Adapter] = []
    if "telegram" in platforms:
        from .telegram import TelegramAdapter

        adapters.append(TelegramAdapter(app, settings))
    if "discord" in platforms:
        from .discord import DiscordAdapter

        adapters.append(DiscordAdapter(app, settings))
    if not adapters:
        from .console import ConsoleAdapter

        adapters.append(ConsoleAdapter(app))
    return adapters
