"""Which adapters run: every platform with a token, else the console."""

from __future__ import annotations

import asyncio
from typing import Callable, Protocol

from bot.app import App
from bot.config import Settings


class Adapter(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or, for the console, end of input)."""


def adapter_factories(app: App, settings: Settings, platforms: list[str]) -> list[tuple[str, Callable[[], Adapter]]]:
    """(name, factory) per adapter to run: a dead adapter is replaced by a fresh one."""
    factories: list[tuple[str, Callable[[], Adapter]]] = []
    if "telegram" in platforms:
        from .telegram import TelegramAdapter

        factories.append(("telegram", lambda: TelegramAdapter(app, settings)))
    if "discord" in platforms:
        from .discord_bot import DiscordAdapter

        factories.append(("discord", lambda: DiscordAdapter(app, settings)))
    if not factories:
        from .console import ConsoleAdapter

        factories.append(("console", lambda: ConsoleAdapter(app)))
    return factories


def create_adapters(app: App, settings: Settings, platforms: list[str]) -> list[Adapter]:
    return [make() for _, make in adapter_factories(app, settings, platforms)]
