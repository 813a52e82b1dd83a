"""/agent end to end on Telegram and Discord: the real client libraries against the fake servers,
the tiny agent model, and the code run in the real sandbox."""

from __future__ import annotations

import pytest

from tests import tiny_agent_model as agent_model
from tests.discord_harness import answer_text, is_done, running
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings

pytestmark = [
    pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning"),
]

POWER = "1267650600228229401496703205376"


@pytest.fixture(scope="session")
def tiny_agent_model():
    return agent_model.agent_model_path()


async def test_telegram_user_sees_code_real_output_and_answer(make_app, tiny_agent_model):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(agent_model=str(tiny_agent_model), agent_tools="python", **telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42, lang="zh-hans")
            fake.send_text(chat, 42, f"/agent {agent_model.COMPUTE_ZH}")
            await fake.wait_until(lambda: any(agent_model.ANSWER_ZH in text for text in fake.texts(chat)))
            (answer,) = fake.messages(chat)
            text = answer.text
            assert "我来用 Python 算一下。" in text and "print(2**100)" in text
            assert POWER in text  # the real output of the code in the sandbox
            assert text.index("print(2**100)") < text.index(POWER) < text.index(agent_model.ANSWER_ZH)
        assert fake.flood_429s == 0


async def test_discord_user_sees_code_real_output_and_answer(make_app, tiny_agent_model):
    fake = FakeDiscord()
    async with fake:
        app = make_app(agent_model=str(tiny_agent_model), agent_tools="python", discord_bot_token=fake.token)
        async with running(app, fake):
            interaction = await fake.slash("agent", fake.alice, prompt=agent_model.COMPUTE_EN)
            await fake.wait_for(lambda: interaction.messages and is_done(interaction.messages[-1]), "/agent")
            text = answer_text(interaction.messages)
            assert "```python\nprint(2**100)\n```" in text
            assert POWER in text
            assert text.index("print(2**100)") < text.index(POWER) < text.index(agent_model.ANSWER_EN)
            assert fake.errors == []
