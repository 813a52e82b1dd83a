"""Wiring: the App with its declared features, and one adapter per configured platform (the
table in `bot/platforms.py`), or the console when none is."""

from __future__ import annotations

import asyncio
import importlib
from typing import Protocol

from bot.app import App
from bot.config import Settings
from bot.platforms import CONSOLE_ADAPTER, PLATFORMS


class Adapter(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or, for the console, end of input)."""


def build_app(settings: Settings) -> App:
    return App(settings)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def create_adapters(app: App, settings: Settings, platforms: list[str]) -> list[Adapter]:
    """One adapter per named platform, in table order; the console when there is none."""
    adapters: list[Adapter] = [_load(p.adapter)(app, settings) for p in PLATFORMS if p.name in platforms]
    return adapters or [_load(CONSOLE_ADAPTER)(app)]
