"""Wiring: the App with its declared features, and one adapter per configured platform (the
table in `bot/platforms.py`), or the console when none is."""

from __future__ import annotations

import asyncio
import importlib
from typing import Callable, Protocol

from bot.app import App
from bot.config import Settings
from bot.platforms import CONSOLE_ADAPTER, PLATFORMS
from bot.store import HistoryStore


class Adapter(Protocol):
    name: str

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or, for the console, end of input)."""


def build_app(settings: Settings, store: HistoryStore | None = None) -> App:
    return App(settings, store=store)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def adapter_factories(app: App, settings: Settings, platforms: list[str]) -> list[tuple[str, Callable[[], Adapter]]]:
    """(name, factory) per adapter to run, in table order; the console when there is none. A
    factory, not an adapter: the supervisor replaces an adapter that died with a fresh one."""
    factories: list[tuple[str, Callable[[], Adapter]]] = [
        (p.name, lambda cls=_load(p.adapter): cls(app, settings)) for p in PLATFORMS if p.name in platforms
    ]
    return factories or [("console", lambda: _load(CONSOLE_ADAPTER)(app))]


def create_adapters(app: App, settings: Settings, platforms: list[str]) -> list[Adapter]:
    """One adapter per named platform, in table order; the console when there is none."""
    return [make() for _, make in adapter_factories(app, settings, platforms)]
