"""Issue 9's "nothing lost" fixes: empty answers, storage faults, one process per DATA_DIR,
adapter restarts, crash recovery on the platforms, buttons under older answers."""

from __future__ import annotations

import pytest

from bot.i18n import t
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


class ScriptedResponder:
    """Stands in for a model whose output the tiny models cannot produce (whitespace only)."""

    def __init__(self, *deltas: str) -> None:
        self.deltas = deltas

    async def respond(self, turn):
        for delta in self.deltas:
            yield delta


async def test_whitespace_only_answer_gets_the_empty_answer_notice_on_telegram(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        app.responders["internlm"] = ScriptedResponder(" ", "\n", " \n\t\n")
        async with running_bot(app):
            chat = fake.private_chat(42, lang="zh-hans")
            fake.send_text(chat, 42, "say nothing")
            await fake.wait_until(lambda: any(b.startswith("regen:") for m in fake.messages(chat) for b in fake.buttons(m)))
            (answer,) = fake.messages(chat)
            assert answer.text == t("empty_answer", "zh")
        assert not [e for e in fake.errors if "empty" in e[2]], fake.errors
