"""End to end: the real discord.py client and the real core with tiny real models, against the
local fake Discord (tests/fake_discord.py)."""

from __future__ import annotations

import asyncio

import pytest

from bot.i18n import t
from tests import tiny_models
from tests.discord_harness import REGENERATE, STOP, answer_text, is_done, key_of, running, stack, until_done
from tests.fake_discord import MAX_CONTENT, FakeDiscord
from tests.slow import slow_down



async def test_chat_ping_streams_pong_into_the_deferred_response(make_app):
    async with stack(make_app) as (fake, app, adapter):
        interaction = await fake.slash("chat", fake.alice, prompt="ping")
        [original] = await until_done(fake, interaction)
        assert interaction.ack_type == 5 and interaction.acked_at - interaction.dispatched_at < 3
        assert original.content == "-# InternLM\npong"
        assert original.content.endswith("pong")
        assert original.custom_ids == [f"{REGENERATE}{fake.alice.id}"]
        assert original.writes[0].content == ""  # the "thinking…" placeholder came first
        assert not interaction.ephemeral
        assert fake.errors == []


async def test_bajie_answers_in_chinese_with_its_header(make_app):
    async with stack(make_app) as (fake, app, adapter):
        interaction = await fake.slash("bajie", fake.alice, locale="zh-CN", prompt="ping")
        [original] = await until_done(fake, interaction)
        assert original.content == "-# 猪八戒\n俺老猪听见了：pong"
        assert original.components[0]["components"][0]["label"] == "重新生成"
        # The persona sticks: a mention now goes to Bajie too.
        question = await fake.send_message(fake.alice, fake.channel, "你好", mention_bot=True)
        reply = await fake.wait_for(lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None))
        assert reply.content == "-# 猪八戒\n俺老猪来也！"
        assert fake.errors == []


async def test_long_answer_continues_in_followups_without_breaking_code(make_app):
    async with stack(make_app, max_new_tokens=150) as (fake, app, adapter):
        interaction = await fake.slash("chat", fake.alice, prompt="code")
        messages = await until_done(fake, interaction)
        assert len(messages) >= 2, "a >2000-character answer needs follow-ups"
        assert all(len(m.content) <= MAX_CONTENT for m in messages)
        # Each full message closes its code fence; the next reopens it (the answer itself never closes).
        assert all(m.content.count("```") == 2 for m in messages[:-1])
        assert all(m.content.startswith("```python\n") for m in messages[1:])
        assert [bool(m.custom_ids) for m in messages] == [False] * (len(messages) - 1) + [True]
        # Remove the fences the splitter added at each cut: what remains is the whole answer.
        text = answer_text(messages)
        pieces = [p.removesuffix("\n```") for p in text.split("\n```python\n")]
        joined = pieces[0] + "".join("\n" + p for p in pieces[1:])
        stored = app.store.history(app.session_key(key_of(fake, fake.alice, fake.channel)), "internlm")[-1].content
        assert len(stored) > 2000
        assert tiny_models.is_code_answer_prefix(stored)
        assert joined.rstrip("\n") == stored.rstrip("\n")
        assert fake.errors == []


async def test_mention_in_a_channel_and_a_dm_both_stream_by_editing_the_reply(make_app):
    async with stack(make_app) as (fake, app, adapter):
        asked = await fake.send_message(fake.bob, fake.channel, "count", mention_bot=True)
        dm = fake.dm_channel(fake.alice)
        asked_dm = await fake.send_message(fake.alice, dm, "count")
        for question in (asked, asked_dm):
            reply = await fake.wait_for(
                lambda: next((m for m in fake.bot_messages() if m.reference_id == question.id and is_done(m)), None)
            )
            assert reply.content == "-# InternLM\n" + tiny_models.COUNT_ANSWER
            assert len(reply.writes) >= 2, "the reply is posted, then edited"
            assert reply.writes[0].content != reply.content
            assert reply.writes[0].content.startswith("-# InternLM\n")
            assert STOP in reply.writes[0].components[0]["components"][0]["custom_id"]
        # "typing…" only where an answer was on its way (and only while its text had not come:
        # bot/streaming.py, tested on virtual time in test_streaming.py)
        assert set(fake.typing) <= {fake.channel.id, dm.id}
        # A guild message that does not mention the bot is not for it (and its text is hidden).
        await fake.send_message(fake.bob, fake.channel, "ping")
        # Slash commands work in DMs too.
        interaction = await fake.slash("chat", fake.alice, dm, prompt="ping")
        assert answer_text(await until_done(fake, interaction)) == "pong"
        assert len(fake.bot_messages()) == 3
        assert fake.errors == []


async def test_threads_are_separate_conversations(make_app):
    async with stack(make_app) as (fake, app, adapter):
        async def ask(channel, text: str) -> str:
            interaction = await fake.slash("chat", fake.alice, channel, prompt=text)
            return answer_text(await until_done(fake, interaction))

        assert await ask(fake.channel, "remember apple") == tiny_models.REMEMBER_ACK
        assert await ask(fake.thread, "recall") == tiny_models.CHAT_UNKNOWN
        assert await ask(fake.channel, "recall") == "apple"


async def test_ten_interactions_at_once_are_all_deferred_in_time_and_answered(make_app):
    async with stack(make_app) as (fake, app, adapter):
        users = [fake.add_user(f"user{i}") for i in range(10)]
        interactions = await asyncio.gather(*(fake.slash("chat", u, prompt="ping") for u in users))
        for interaction in interactions:
            await until_done(fake, interaction)
        assert all(i.acked_at is not None and i.acked_at - i.dispatched_at < 3 for i in interactions)
        assert [answer_text(i.messages) for i in interactions] == ["pong"] * 10
        assert fake.errors == []


async def test_stop_button_is_for_the_asker_only_and_stops_the_answer(make_app):
    async with stack(make_app, max_new_tokens=3000) as (fake, app, adapter):
        await slow_down(app)  # still writing when the buttons are pressed, however fast the machine
        interaction = await fake.slash("chat", fake.alice, prompt="code")
        original = await fake.wait_for(lambda: interaction.original if interaction.original and interaction.original.custom_ids else None)
        stop_id = f"{STOP}{fake.alice.id}"
        assert original.custom_ids == [stop_id]
        refused = await fake.press(original, stop_id, fake.bob, locale="zh-CN")
        await fake.wait_for(lambda: refused.original is not None)
        assert refused.ephemeral and refused.original.content == t("discord_not_yours", "zh")
        pressed = await fake.press(original, stop_id, fake.alice)
        messages = await until_done(fake, interaction)
        assert pressed.ack_type == 6  # acknowledged silently; the answer shows the stop
        assert messages[-1].content.endswith(t("stopped_mark", "en"))
        [question, answer] = app.store.history(app.session_key(key_of(fake, fake.alice, fake.channel)), "internlm")
        assert answer.status == "stopped" and tiny_models.is_code_answer_prefix(answer.content)
        assert fake.errors == []


async def test_regenerate_asks_the_last_question_again(make_app):
    async with stack(make_app) as (fake, app, adapter):
        first = await fake.slash("chat", fake.alice, prompt="ping")
        [original] = await until_done(fake, first)
        pressed = await fake.press(original, f"{REGENERATE}{fake.alice.id}", fake.alice)
        [again] = await until_done(fake, pressed)
        assert again.content == "-# InternLM\npong"
        key = app.session_key(key_of(fake, fake.alice, fake.channel))
        assert [m.content for m in app.store.history(key, "internlm")] == ["ping", "pong"]
        assert fake.errors == []


async def test_allowlist_refuses_others_in_their_language(make_app):
    fake = FakeDiscord()
    async with stack(make_app, fake, discord_allowed_users=str(fake.alice.id)) as (fake, app, adapter):
        refused = await fake.slash("chat", fake.bob, locale="zh-CN", prompt="ping")
        await fake.wait_for(lambda: refused.original is not None and refused.original.writes[-1].content)
        assert refused.original.content == t("not_allowed", "zh")
        asked = await fake.send_message(fake.bob, fake.channel, "ping", mention_bot=True)
        allowed = await fake.slash("chat", fake.alice, prompt="ping")
        await until_done(fake, allowed)
        assert answer_text(allowed.messages) == "pong"
        # The core refuses at most once a minute; the mention got no second refusal.
        assert not [m for m in fake.bot_messages() if m.reference_id == asked.id]
        # A refused slash command that the core leaves unanswered does not stay "thinking…".
        again = await fake.slash("chat", fake.bob, prompt="ping")
        await fake.wait_for(lambda: again.original is not None and again.original.deleted)
        assert fake.errors == []


async def test_channel_allowlist_covers_its_threads(make_app):
    fake = FakeDiscord()
    async with stack(make_app, fake, discord_allowed_channels=str(fake.channel.id)) as (fake, app, adapter):
        in_thread = await fake.slash("chat", fake.alice, fake.thread, prompt="ping")
        assert answer_text(await until_done(fake, in_thread)) == "pong"
        elsewhere = await fake.slash("chat", fake.bob, fake.other_channel, prompt="ping")
        await fake.wait_for(lambda: elsewhere.original is not None and elsewhere.original.content)
        assert elsewhere.original.content == t("not_allowed", "en")


async def test_commands_are_described_localised_and_synced_only_when_changed(make_app, make_settings):
    fake = FakeDiscord()
    async with fake:
        settings = make_settings(discord_bot_token=fake.token)
        async with running(make_app(settings), fake):
            pass
        assert fake.syncs == ["global"]
        commands = {c["name"]: c for c in fake.commands["global"]}
        assert set(commands) == {"help", "chat", "bajie", "agent", "image", "reset", "stop", "persona"}
        for command in commands.values():
            assert command["description_localizations"]["zh-CN"] == t(f"cmd_{command['name']}", "zh")[:100]
        assert commands["bajie"]["options"][0]["name"] == "prompt"
        assert commands["bajie"]["options"][0]["description_localizations"]["zh-CN"] == t("discord_arg_prompt", "zh")
        image = {o["name"]: o for o in commands["image"]["options"]}
        assert image["image"]["type"] == 11 and image["image"]["required"] and image["question"]["type"] == 3
        async with running(make_app(settings), fake):  # a restart with the same commands
            pass
        assert fake.syncs == ["global"]
        guild_settings = settings.model_copy(update={"discord_guild_ids": frozenset({str(fake.guild.id)})})
        async with running(make_app(guild_settings), fake):
            pass
        assert fake.syncs == ["global", str(fake.guild.id)]
        assert {c["name"] for c in fake.commands[str(fake.guild.id)]} == set(commands)
        assert fake.errors == []
