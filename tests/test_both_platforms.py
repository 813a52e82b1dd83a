"""Telegram and Discord served at once by one App in one process."""

from __future__ import annotations

from bot.platforms import platform_names
from launcher.compose import create_adapters
from tests.discord_harness import answer_text, running, until_done
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings


async def test_one_app_serves_telegram_and_discord_at_once(make_app):
    async with FakeTelegram(TOKEN) as telegram, FakeDiscord() as discord:
        app = make_app(**telegram_settings(telegram), discord_bot_token=discord.token)
        assert platform_names(app.settings) == ["telegram", "discord"]
        assert [a.name for a in create_adapters(app, app.settings, platform_names(app.settings))] == ["telegram", "discord"]
        async with running_bot(app), running(app, discord):
            chat = telegram.private_chat(42)
            telegram.send_text(chat, 42, "/bajie ping")
            interaction = await discord.slash("chat", discord.alice, prompt="ping")
            await telegram.wait_until(lambda: "俺老猪听见了：pong" in telegram.texts(chat))
            assert answer_text(await until_done(discord, interaction)) == "pong"
        # each platform keeps its own sessions in the one database
        sessions = {row[0].split(":")[0] for row in app.store.db.execute("SELECT session FROM messages")}
        assert sessions == {"telegram", "discord"}
