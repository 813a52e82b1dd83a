"""Features are declared once: a persona added as one declaration is routed, listed in /help,
put in Telegram's command menu and synced as a Discord slash command, with its own rate
bucket and allowlist honoured."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot.app import App
from bot.features import FEATURES, Feature
from bot.i18n import t
from bot.messages import Incoming
from tests.surfaces import RecordingSurface

PIRATE_PROMPT = "You are a pirate. Answer like one."
# The one declaration a newcomer writes (plus its texts, in both languages).
PIRATE = Feature(
    "pirate", 10, {
        "cmd_pirate": {"en": "Talk like a pirate", "zh": "用海盗的口吻聊天"},
        "persona_pirate": {"en": "Pirate", "zh": "海盗"},
        "greeting_pirate": {"en": "Arr! Ask away.", "zh": "啊哈！尽管问吧。"},
    },
    argument="prompt", persona="pirate", role="chat", system_prompt=lambda settings: PIRATE_PROMPT,
)


@pytest.fixture
def pirate_app(make_settings):
    apps: list[App] = []

    def make(feature: Feature = PIRATE, **overrides) -> App:
        app = App(make_settings(**overrides), features=(*FEATURES, feature), clock=lambda: 1000.0)  # time stands still
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.store.close()


def msg(text: str, user: str = "7", platform: str = "test") -> Incoming:
    return Incoming(platform=platform, chat_id="c", user_id=user, text=text)


async def say(app: App, text: str, **kw) -> str:
    surface = RecordingSurface()
    await app.handle(msg(text, **kw), surface)
    return surface.visible


async def test_a_declared_persona_is_routed_and_listed_in_help(pirate_app):
    app = pirate_app()
    assert await say(app, "/pirate") == "Arr! Ask away."
    assert await say(app, "/persona") == t("persona_current", "en", persona="Pirate")
    await say(app, "ping")  # a plain message now goes to the pirate, on the chat model
    prompt = app.hub.get("chat").last_prompt
    assert prompt[0].content == PIRATE_PROMPT and prompt[-1].content == "ping"
    assert [m.content for m in app.store.history(app.session_key(msg("")), "pirate")][0] == "ping"
    help_text = await say(app, "/help")
    assert "/pirate — Talk like a pirate" in help_text
    assert help_text.index("/persona —") < help_text.index("/pirate —")  # menu order
    assert "/pirate — 用海盗的口吻聊天" in await _say_zh(app, "/help")


async def _say_zh(app: App, text: str) -> str:
    surface = RecordingSurface()
    await app.handle(Incoming(platform="test", chat_id="c", user_id="7", text=text, language="zh-hans"), surface)
    return surface.visible


async def test_the_declared_allowlist_and_rate_bucket_apply(pirate_app):
    app = pirate_app(replace(PIRATE, allowlist="agent_allowed_users", bucket="agent"),
                     agent_allowed_users="test:1", agent_rate_limit_messages=1, agent_rate_limit_per_minute=0.01)
    assert await say(app, "/pirate ping", user="2") == t("not_allowed", "en")
    assert app.hub.loaded == []
    await say(app, "/pirate ping", user="1")
    assert await say(app, "/pirate ping", user="1") == t("rate_limited", "en", seconds=6000)
    assert await say(app, "/chat ping", user="1") == "pong"  # the chat bucket is another one


async def test_a_declared_persona_reaches_both_platforms_menus(pirate_app):
    from tests.discord_harness import running
    from tests.fake_discord import FakeDiscord
    from tests.fake_telegram import FakeTelegram
    from tests.telegram_harness import TOKEN, running_bot, telegram_settings

    async with FakeTelegram(TOKEN) as telegram, FakeDiscord() as discord:
        app = pirate_app(**telegram_settings(telegram), discord_bot_token=discord.token)
        async with running_bot(app), running(app, discord):
            chat = telegram.private_chat(42)
            telegram.send_text(chat, 42, "/pirate")
            await telegram.wait_until(lambda: telegram.texts(chat))
            assert telegram.texts(chat) == ["Arr! Ask away."]
            interaction = await discord.slash("pirate", discord.alice)
            await discord.wait_for(lambda: interaction.original is not None and interaction.original.content)
            assert interaction.original.content == "Arr! Ask away."
        menus = {lang: {c["command"]: c["description"] for c in telegram.commands[lang]} for lang in (None, "zh")}
        assert menus[None]["pirate"] == "Talk like a pirate" and menus["zh"]["pirate"] == "用海盗的口吻聊天"
        assert list(menus[None])[-1] == "pirate"
        synced = {c["name"]: c for c in discord.commands["global"]}
        assert synced["pirate"]["description"] == "Talk like a pirate"
        assert synced["pirate"]["description_localizations"]["zh-CN"] == "用海盗的口吻聊天"
        assert [o["name"] for o in synced["pirate"]["options"]] == ["prompt"]


def test_a_declaration_without_its_texts_is_refused_at_start(make_settings):
    from bot.features import Catalogue

    with pytest.raises(ValueError, match="greeting_pirate"):
        Catalogue((*FEATURES, replace(PIRATE, texts={k: v for k, v in PIRATE.texts.items() if k != "greeting_pirate"})))
    with pytest.raises(ValueError, match="lacks"):
        App(make_settings(), features=(*FEATURES, replace(PIRATE, texts={**PIRATE.texts, "cmd_pirate": {"en": "only English"}})))
