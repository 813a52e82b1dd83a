"""Run the real TelegramAdapter against the fake Bot API server (for tests and the bench)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import AsyncIterator

from adapters.telegram import TelegramAdapter
from bot.app import App
from tests.fake_telegram import FakeTelegram

TOKEN = "123456:TEST-token-abcdefghijklmnopqrstuv"


def telegram_settings(fake: FakeTelegram, **overrides) -> dict:
    """Settings overrides that point the adapter at the fake (answers get 30 s at shutdown)."""
    return dict(telegram_bot_token=TOKEN, telegram_api_base_url=fake.base_url, **{"shutdown_grace": 30.0, **overrides})


@asynccontextmanager
async def running_bot(app: App, **adapter_options) -> AsyncIterator[TelegramAdapter]:
    """Start the adapter (getMe, setMyCommands, polling or webhook); stop it like SIGTERM does."""
    options = dict(read_timeout=3.0, poll_timeout=5)
    options.update(adapter_options)
    await app.prepare()  # as the real start does
    adapter = TelegramAdapter(app, app.settings, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(adapter.run(stop))
    ready = asyncio.create_task(adapter.ready.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the start-up error
        raise AssertionError("the adapter stopped at once")
    adapter.stop_event, adapter.task = stop, task
    try:
        yield adapter
    finally:
        stop.set()
        await task
