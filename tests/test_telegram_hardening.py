"""Telegram entry points under hostile input (issue 9): the chat allowlist and webhook mode."""

from __future__ import annotations

import pytest

from bot.access import AccessPolicy
from bot.config import Settings
from bot.i18n import t
from bot.messages import Incoming
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


async def test_chat_allowlist_ignores_forum_topic_ids(make_app):
    """TELEGRAM_ALLOWED_CHATS="-100888,7": topic 7 of a foreign supergroup is not chat 7."""
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), telegram_allowed_chats="-100888,7")
        async with running_bot(app):
            foreign = fake.group_chat(-100999, forum=True)
            fake.user(5)
            fake.send_text(foreign, 5, "@InternLMTestBot ping", thread_id=7)
            await fake.wait_until(lambda: fake.texts(foreign))
            assert fake.texts(foreign) == [t("not_allowed", "en")]
            assert app.hub.loaded == []  # the model was never asked
            allowed = fake.group_chat(-100888, forum=True)
            fake.send_text(allowed, 5, "@InternLMTestBot ping", thread_id=3)  # any topic of an allowed chat
            await fake.wait_until(lambda: "pong" in fake.texts(allowed))
            assert fake.messages(allowed)[-1].thread_id == 3


def test_only_discord_threads_are_matched_by_their_own_id():
    policy = AccessPolicy(Settings(_env_file=None, telegram_allowed_chats="-100888,7", discord_allowed_channels="55"))

    def msg(platform, chat, thread=None):
        return Incoming(platform=platform, chat_id=chat, user_id="1", text="hi", thread_id=thread)

    assert policy.allows(msg("telegram", "-100888", "3")) and policy.allows(msg("telegram", "7"))
    assert not policy.allows(msg("telegram", "-100999", "7"))
    assert policy.allows(msg("discord", "44", "55"))  # a listed thread inside another channel
    assert policy.allows(msg("discord", "55", "66")) and not policy.allows(msg("discord", "44", "66"))
