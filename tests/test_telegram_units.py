"""The Telegram adapter's parts without a model: the fake server's strictness (spoken to by the
real python-telegram-bot), the pacer, update mapping and Markdown rendering."""

from __future__ import annotations

import asyncio
import time

import pytest
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Message, MessageEntity
from telegram.error import BadRequest, InvalidToken, RetryAfter

from adapters.telegram.handlers import BotIdentity, incoming_from_message
from adapters.telegram.render import render
from adapters.telegram.pacing import FINAL_BUDGET, STREAM_BUDGET, Pacer
from adapters.telegram.surface import retry_seconds
from tests.fake_telegram import FakeTelegram
from tests.surfaces import FakeClock
from tests.telegram_harness import TOKEN
from tests.waiting import until

# PTB itself reads its deprecated RetryAfter.retry_after when it builds the exception
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

ME = BotIdentity(7_000_000_001, "InternLMTestBot")


async def test_fake_is_strict_like_telegram():
    async with FakeTelegram(TOKEN, enforce_limits=False) as fake:
        chat = fake.private_chat(42)
        async with Bot(TOKEN, base_url=fake.base_url) as bot:
            assert bot.username == "InternLMTestBot"
            sent = await bot.send_message(chat, "hello")
            with pytest.raises(BadRequest, match="(?i)message is not modified"):
                await bot.edit_message_text("hello", chat_id=chat, message_id=sent.message_id)
            with pytest.raises(BadRequest, match="(?i)message is too long"):
                await bot.send_message(chat, "x" * 4097)
            with pytest.raises(BadRequest, match="(?i)message text is empty"):
                await bot.send_message(chat, "  ")
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(chat, "<b>bold", parse_mode="HTML")
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(chat, "short", entities=[MessageEntity("bold", 2, 10)])
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(chat, "abcdef", entities=[MessageEntity("bold", 0, 4), MessageEntity("italic", 2, 4)])
            with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
                markup = InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="y" * 65)]])
                await bot.send_message(chat, "hi", reply_markup=markup)
            with pytest.raises(BadRequest, match="(?i)chat not found"):
                await bot.send_message(999, "hi")
            # a keyboard change alone is a modification; the markup is kept per message
            markup = InlineKeyboardMarkup([[InlineKeyboardButton("Stop", callback_data="stop:42")]])
            await bot.edit_message_text("hello", chat_id=chat, message_id=sent.message_id, reply_markup=markup)
            assert fake.buttons(fake.messages(chat)[0]) == ["stop:42"]
            fake.delete_message(chat, sent.message_id)
            with pytest.raises(BadRequest, match="(?i)message to edit not found"):
                await bot.edit_message_text("new", chat_id=chat, message_id=sent.message_id)
            html = await bot.send_message(chat, "<b>bold</b> &amp; <a href='https://x.org'>link</a>", parse_mode="HTML")
            assert html.text == "bold & link"
            assert [e.type for e in html.entities] == ["bold", "text_link"]
        with pytest.raises(InvalidToken):
            async with Bot("123456:WRONG-token-abcdefghijklmnopqrs", base_url=fake.base_url):
                pass


async def test_fake_enforces_flood_limits_and_injects_faults():
    async with FakeTelegram(TOKEN) as fake:
        chat = fake.private_chat(42)
        async with Bot(TOKEN, base_url=fake.base_url) as bot:
            await bot.send_message(chat, "m0")
            with pytest.raises(RetryAfter) as caught:  # within a second of the accepted one
                await bot.send_message(chat, "one too many")
            assert retry_seconds(caught.value) >= 1
            assert fake.flood_429s == 1
            assert fake.flood_hits[0][2] == "chat"
            assert len(fake.texts(chat)) == 1  # the refused message does not exist
            fake.fail_next("sendChatAction", "429", retry_after=7)
            with pytest.raises(RetryAfter) as caught:
                await bot.send_chat_action(chat, "typing")
            assert retry_seconds(caught.value) == 7
            assert fake.flood_429s == 1  # injected 429s are not counted as limit hits
            fake.fail_next("sendChatAction", "502")
            with pytest.raises(Exception, match="(?i)Bad Gateway"):
                await bot.send_chat_action(chat, "typing")


async def test_fake_get_updates_honours_its_timeout_and_offset():
    async with FakeTelegram(TOKEN) as fake:
        chat = fake.private_chat(42)
        async with Bot(TOKEN, base_url=fake.base_url) as bot:
            started = time.monotonic()
            assert await bot.get_updates(timeout=1) == ()
            assert time.monotonic() - started >= 0.9  # it waited for an update that never came
            waiting = asyncio.create_task(bot.get_updates(timeout=20))
            await until(lambda: len(fake.calls_of("getUpdates")) == 2)  # the long poll is waiting
            fake.send_text(chat, 42, "hello")
            (update,) = await waiting  # answered when the update came
            assert update.message.text == "hello"
            assert (await bot.get_updates(offset=update.update_id + 1, timeout=0)) == ()


async def test_pacer_caps_the_overall_rate_counting_requests_until_a_second_after_they_completed():
    clock = FakeClock()
    pacer = Pacer(clock=clock, sleep=clock.sleep)
    slots = [pacer.try_take(str(chat), 1.0, STREAM_BUDGET) for chat in range(STREAM_BUDGET)]
    assert all(slots)  # other chats are not blocked
    assert pacer.try_take("new", 1.0, STREAM_BUDGET) is None  # the streaming share is used up
    final = pacer.try_take("final", 1.0, FINAL_BUDGET)
    assert final is not None  # complete messages still go
    await clock.advance(2.0)
    # requests still in flight keep counting: they may reach Telegram at any moment
    assert pacer.try_take("new", 1.0, STREAM_BUDGET) is None
    for slot in slots:
        pacer.release(slot)
    assert pacer.try_take("new", 1.0, STREAM_BUDGET) is None  # ...and for a second after they completed
    await clock.advance(1.0)
    assert pacer.try_take("new", 1.0, STREAM_BUDGET) is not None
    pacer.hold("2", 5.0)
    assert pacer.wait_for("2", STREAM_BUDGET) == pytest.approx(5.0)  # retry_after is kept
    assert pacer.stats.rate_limited == 1


def message(text: str, *, chat_type: str = "supergroup", entities=(), reply_from: int | None = None, topic: int | None = None) -> Message:
    data = {
        "message_id": 10, "date": 0, "text": text, "entities": list(entities),
        "chat": {"id": -100 if chat_type != "private" else 5, "type": chat_type, "title": "g"},
        "from": {"id": 5, "is_bot": False, "first_name": "Ann", "language_code": "zh-hans"},
    }
    if reply_from is not None:
        data["reply_to_message"] = {"message_id": topic or 3, "date": 0, "chat": data["chat"], "text": "x",
                                    "from": {"id": reply_from, "is_bot": reply_from == ME.id, "first_name": "B"}}
    if topic is not None:
        data.update(message_thread_id=topic, is_topic_message=True)
    return Message.de_json(data, None)


def test_group_messages_are_for_the_bot_only_when_addressed():
    assert incoming_from_message(message("ping"), ME, None) is None
    mention = "🙂 @InternLMTestBot ping"  # the emoji takes two UTF-16 units
    msg = incoming_from_message(message(mention, entities=[{"type": "mention", "offset": 3, "length": 16}]), ME, None)
    assert (msg.text, msg.is_group, msg.language, msg.command) == ("🙂 ping", True, "zh-hans", None)
    assert incoming_from_message(message("/chat@OtherBot hi", entities=[{"type": "bot_command", "offset": 0, "length": 14}]), ME, None) is None
    cmd = incoming_from_message(message("/Bajie@internlmtestbot 你好", entities=[{"type": "bot_command", "offset": 0, "length": 22}]), ME, None)
    assert (cmd.command, cmd.text) == ("bajie", "你好")
    assert incoming_from_message(message("ping", reply_from=ME.id), ME, None).text == "ping"
    assert incoming_from_message(message("ping", reply_from=77), ME, None) is None
    # in a forum topic, the "reply" to the topic's first message is not a reply to the bot
    assert incoming_from_message(message("ping", reply_from=ME.id, topic=3), ME, None) is None
    topic = incoming_from_message(message("@InternLMTestBot hi", entities=[{"type": "mention", "offset": 0, "length": 16}], topic=9), ME, None)
    assert topic.thread_id == "9"
    private = incoming_from_message(message("ping", chat_type="private"), ME, None)
    assert (private.text, private.is_group, private.chat_id) == ("ping", False, "5")


def test_markdown_renders_to_entities_and_falls_back_to_plain_text():
    text, entities = render("**bold** and `code`\n\n```python\nprint(1)\n```")
    assert text.startswith("bold and code")
    assert {(e.type, e.language) for e in entities} == {("bold", None), ("code", None), ("pre", "python")}
    assert render("plain words") == ("plain words", [])
    assert render("   ") == ("   ", [])  # nothing to render: the text as it is


async def test_a_rejected_token_stops_the_adapter_with_a_clear_error_that_hides_it(tmp_path):
    from adapters.telegram import TelegramAdapter
    from bot.app import App
    from bot.config import Settings

    wrong = "123456:WRONG-token-abcdefghijklmnopqrs"
    async with FakeTelegram(TOKEN) as fake:
        settings = Settings(_env_file=None, data_dir=tmp_path, telegram_bot_token=wrong, telegram_api_base_url=fake.base_url)
        app = App(settings)
        try:
            with pytest.raises(RuntimeError, match="TELEGRAM_BOT_TOKEN") as caught:
                await TelegramAdapter(app, settings).run(asyncio.Event())
        finally:
            app.store.close()
    assert "WRONG-token" not in str(caught.value)
