"""End-to-end: the real python-telegram-bot adapter, the real core and the tiny real models,
against the strict fake Bot API server (limits enforced unless a test says otherwise)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import aiohttp
import pytest

from bot.features import FEATURES, Catalogue
from bot.i18n import t
from bot.logs import setup_logging
from tests.slow import slow_down
from tests.surfaces import PictureRecorder, tiny_picture
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings
from tests.tiny_models import COUNT_ANSWER, CODE_LINE

# PTB itself reads its deprecated RetryAfter.retry_after when it builds the exception
pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")

RENDERED_MARKDOWN = "bold and code\n\n⦁ item one\n⦁ item two\n\nlink"


def _last_answer_id(app) -> int:
    return app.store.db.execute("SELECT max(id) FROM messages WHERE role='assistant'").fetchone()[0]


def has_final(fake: FakeTelegram, chat: int, expected: str, **kw) -> bool:
    return expected in fake.texts(chat, **kw)


def regen_button_shown(fake: FakeTelegram, chat: int) -> bool:
    messages = fake.messages(chat)
    return bool(messages) and any(b.startswith("regen:") for b in fake.buttons(messages[-1]))


async def test_private_ping_streams_to_exactly_pong_with_menu_and_buttons(make_app, monkeypatch):
    monkeypatch.setattr("bot.streaming.TYPING_DELAY", 0.0)  # "typing…" at once, however fast the text
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42, lang="en")
            fake.send_text(chat, 42, "ping")
            await fake.wait_until(lambda: regen_button_shown(fake, chat))
            (answer,) = fake.messages(chat)
            assert answer.text == "pong"
            (button,) = fake.buttons(answer)  # names the asker and the stored answer
            assert re.fullmatch(r"regen:42:\d+", button) and int(button.split(":")[2]) == _last_answer_id(app)
            assert any(action == "typing" and c == chat for _, c, action in fake.actions)
            # the menu, in English and Chinese, from the core's commands
            assert [c["command"] for c in fake.commands[None]] == [f.command for f in app.menu("telegram")]
            assert fake.commands[None][0]["description"] == t("cmd_start", "en")
            assert fake.commands["zh"][0]["description"] == t("cmd_start", "zh")
            # /start greets in the user's language
            zh = fake.private_chat(43, lang="zh-hans")
            fake.send_text(zh, 43, "/start")
            await fake.wait_until(lambda: fake.texts(zh))
            assert fake.texts(zh)[0].startswith("你好！")
            assert fake.messages(zh)[0].reply_markup is None  # notices have no buttons
        assert fake.flood_429s == 0


async def test_bajie_command_answers_in_bajies_voice(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42, lang="zh")
            fake.send_text(chat, 42, "/bajie 你好")
            await fake.wait_until(lambda: has_final(fake, chat, "俺老猪来也！"))
            fake.send_text(chat, 42, "ping")  # the persona sticks
            await fake.wait_until(lambda: has_final(fake, chat, "俺老猪听见了：pong"))


async def test_markdown_is_rendered_on_the_final_edit_with_a_plain_fallback(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "markdown")
            await fake.wait_until(lambda: has_final(fake, chat, RENDERED_MARKDOWN))
            entities = {(e["type"], e.get("url")) for e in fake.messages(chat)[0].entities}
            assert entities == {("bold", None), ("code", None), ("text_link", "https://internlm.intern-ai.org.cn")}
            # Telegram rejects the entities: the same answer arrives as plain text, not lost
            other = fake.private_chat(43)
            fake.fail_next("sendMessage", "entities", chat_id=other, times=3)
            fake.fail_next("editMessageText", "entities", chat_id=other, times=3)
            fake.send_text(other, 43, "markdown")
            await fake.wait_until(lambda: regen_button_shown(fake, other))
            (plain,) = fake.messages(other)
            assert plain.text.startswith("**bold** and `code`") and plain.entities == []


async def test_an_answer_longer_than_4096_continues_without_breaking_the_code_block(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), max_new_tokens=260)  # about 5500 characters
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "code")
            await fake.wait_until(lambda: regen_button_shown(fake, chat))
            messages = fake.messages(chat)
            assert len(messages) >= 2
            lines = []
            for message in messages:
                assert len(message.text) <= 4096
                # each message is one whole python code block: rendered as a "pre" entity
                assert [(e["type"], e.get("language")) for e in message.entities] == [("pre", "python")]
                lines += message.text.split("\n")
            stored = app.store.history(app.session_key(_incoming(chat)), "internlm")[-1].content
            body = stored.removeprefix("```python\n").rstrip("`\n").split("\n")
            assert lines == [line for line in body if line]  # nothing lost, nothing doubled
            assert all(line == CODE_LINE.strip() for line in lines[:-1])
        assert fake.flood_429s == 0


def _incoming(chat: int, user: int | None = None, **kw):
    from bot.messages import Incoming

    return Incoming(platform="telegram", chat_id=str(chat), user_id=str(user or chat), **kw)


async def test_twenty_chats_stream_at_once_without_flood_errors(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), max_new_tokens=200, max_concurrent_generations=20)
        async with running_bot(app):
            chats = [fake.private_chat(1000 + i) for i in range(20)]
            for chat in chats:
                fake.send_text(chat, chat, "code")
            await fake.wait_until(lambda: all(regen_button_shown(fake, c) for c in chats))
            for chat in chats:
                lines = "\n".join(fake.texts(chat)).split("\n")
                assert len(lines) > 150 and all(line == CODE_LINE.strip() for line in lines[:-1])
            # nobody waited for another chat: every chat showed text before any chat finished
            first = {w.chat_id: w.at for w in reversed(fake.writes)}
            finals = [fake.messages(c)[-1].versions[-1][0] for c in chats]
            assert max(first.values()) < min(finals)
            assert all(len(fake.messages(c)[0].versions) >= 2 for c in chats)  # each one streamed
        assert fake.flood_429s == 0


async def test_a_429_delays_the_answer_but_never_loses_it(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.fail_next("sendMessage", "429", retry_after=2, chat_id=chat)
            fake.send_text(chat, 42, "count")
            await fake.wait_until(lambda: regen_button_shown(fake, chat))
            assert fake.texts(chat) == [COUNT_ANSWER]
            refused = [at for at, method, p in fake.calls if method == "sendMessage"][0]
            assert fake.writes[0].at - refused >= 2.0 - 0.05  # retry_after was honoured
            # 5xx answers and a timed-out request cost nothing either
            other = fake.private_chat(43)
            fake.fail_next("sendMessage", "502", chat_id=other)
            fake.fail_next("editMessageText", "timeout", delay=4.0, chat_id=other)
            fake.fail_next("editMessageText", "500", chat_id=other)
            fake.send_text(other, 43, "count")
            await fake.wait_until(lambda: regen_button_shown(fake, other))
            assert fake.texts(other) == [COUNT_ANSWER]
        assert fake.flood_429s == 0


async def test_a_deleted_answer_continues_in_a_new_message(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), max_new_tokens=150)
        await slow_down(app)  # the test acts while the answer streams
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "code")
            await fake.wait_until(lambda: any("print(" in m.text for m in fake.messages(chat)))
            fake.delete_message(chat, fake.messages(chat)[0].message_id)
            await fake.wait_until(lambda: regen_button_shown(fake, chat))
            assert len(fake.messages(chat)) == 1
            assert fake.messages(chat)[0].text.startswith("print('hello world')")


async def test_stop_and_regenerate_buttons_work_only_for_the_asker(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), max_new_tokens=800)
        await slow_down(app)  # the test acts while the answer streams
        async with running_bot(app):
            group = fake.group_chat(-1001)
            fake.user(5, lang="en")
            fake.user(6, lang="zh")
            fake.send_text(group, 5, "@InternLMTestBot code")

            def streaming_code():
                return next((m for m in fake.messages(group) if "print(" in m.text and fake.buttons(m)), None)

            await fake.wait_until(lambda: streaming_code() is not None)
            streaming = streaming_code()
            (button,) = fake.buttons(streaming)  # names the asker and this answer
            assert re.fullmatch(r"stop:5:[0-9a-f]{8}", button)
            assert fake.messages(group)[0].reply_to is not None  # in a group the answer quotes the question
            fake.press(group, streaming.message_id, 6)  # someone else
            await fake.wait_until(lambda: len(fake.answers) == 1)
            assert fake.answers[0]["show_alert"] and fake.answers[0]["text"] == t("telegram_not_your_button", "zh")
            fake.press(group, streaming.message_id, 5)
            await fake.wait_until(lambda: regen_button_shown(fake, group))
            assert fake.answers[1]["text"] == t("stop_done", "en")
            assert fake.messages(group)[-1].text.endswith(t("stopped_mark", "en"))
            # Regenerate asks the last question again (here: a new question first). The history is
            # cleared first: the tiny model is trained to answer after a short cut code answer,
            # and how long this one ran before the press depends on the machine's speed.
            fake.send_text(group, 5, "/reset@InternLMTestBot")
            await fake.wait_until(lambda: has_final(fake, group, t("reset_done", "en", persona=t("persona_internlm", "en"))))
            fake.send_text(group, 5, "@InternLMTestBot ping")
            await fake.wait_until(lambda: has_final(fake, group, "pong"))
            count = len(fake.messages(group))
            fake.press(group, fake.messages(group)[-1].message_id, 5)
            await fake.wait_until(lambda: len(fake.messages(group)) == count + 1 and regen_button_shown(fake, group))
            assert fake.messages(group)[-1].text == "pong"
            history = app.store.history(app.session_key(_incoming(group, 5, is_group=True)), "internlm")
            assert [m.content for m in history][-2:] == ["ping", "pong"]
            assert sum(m.content == "ping" for m in history) == 1  # replaced, not appended
        assert fake.flood_429s == 0


async def test_the_stop_command_ends_the_answer_at_once(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), max_new_tokens=1800)
        await slow_down(app)  # the test acts while the answer streams
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "code")
            await fake.wait_until(lambda: any("print(" in m.text for m in fake.messages(chat)))
            fake.send_text(chat, 42, "/stop")
            await fake.wait_until(lambda: t("stop_done", "en") in fake.texts(chat))
            answer = fake.messages(chat)[0]
            await fake.wait_until(lambda: fake.buttons(answer)[:1] == [f"regen:42:{_last_answer_id(app)}"])
            assert answer.text.startswith("print('hello world')")
            assert answer.text.endswith(t("stopped_mark", "en"))
            assert len(fake.messages(chat)) == 2  # stopped well before the answer filled a message


async def test_group_rules_topics_and_sessions(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            group = fake.group_chat(-1002, forum=True)
            fake.send_text(group, 5, "ping")  # not addressed: ignored
            fake.send_text(group, 5, "/chat@OtherBot ping")  # another bot's command: ignored
            fake.send_text(group, 5, "@InternLMTestBot remember apple")
            await fake.wait_until(lambda: has_final(fake, group, "OK"))
            bot_message = fake.messages(group)[-1].message_id
            fake.send_text(group, 6, "recall", reply_to=bot_message)  # a reply to the bot is addressed
            await fake.wait_until(lambda: has_final(fake, group, "I don't know."))  # user 6 has their own session
            fake.send_text(group, 5, "/chat@InternLMTestBot recall")
            await fake.wait_until(lambda: has_final(fake, group, "apple"))
            # a forum topic is a conversation of its own, answered in the topic
            fake.send_text(group, 5, "@InternLMTestBot recall", thread_id=77)
            await fake.wait_until(lambda: fake.messages(group, thread_id=77))
            await fake.wait_until(lambda: regen_button_shown(fake, group))
            assert fake.texts(group, thread_id=77) == ["I don't know."]
            assert len(fake.messages(group)) == 4  # the two unaddressed messages got no answer

    async with FakeTelegram(TOKEN) as fake:  # one shared conversation per group
        app = make_app(**telegram_settings(fake), group_sessions="shared")
        async with running_bot(app):
            group = fake.group_chat(-1003)
            fake.send_text(group, 5, "@InternLMTestBot remember banana")
            await fake.wait_until(lambda: has_final(fake, group, "OK"))
            fake.send_text(group, 6, "@InternLMTestBot recall")
            await fake.wait_until(lambda: has_final(fake, group, "banana"))


async def test_a_user_not_on_the_allowlist_never_reaches_the_model(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake), telegram_allowed_users="42")
        async with running_bot(app):
            stranger = fake.private_chat(43)
            fake.send_text(stranger, 43, "ping")
            await fake.wait_until(lambda: fake.texts(stranger))
            assert fake.texts(stranger) == [t("not_allowed", "en")]
            assert app.hub.loaded == []  # no model was even loaded
            allowed = fake.private_chat(42)
            fake.send_text(allowed, 42, "ping")
            await fake.wait_until(lambda: has_final(fake, allowed, "pong"))


async def test_photos_and_image_files_reach_the_image_path(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake, telegram_file_base_url=fake.file_base_url))
        declared = app.features
        app.features = Catalogue([f for f in FEATURES if f.argument != "image"])  # a bot without pictures
        async with running_bot(app):
            chat = fake.private_chat(42)
            fake.send_photo(chat, 42, b"\x89PNG fake photo", caption="what is this?")
            await fake.wait_until(lambda: fake.texts(chat))
            assert fake.texts(chat) == [t("not_available", "en", feature=t("feature_image", "en"))]
            assert fake.downloads == []  # nothing fetched for nothing

            app.features, app.responders["vision"] = declared, (recorder := PictureRecorder())
            gif = tiny_picture("GIF")
            fake.send_document(chat, 42, gif, file_name="a.gif", mime_type="image/gif", caption="and this?")
            await fake.wait_until(lambda: len(fake.texts(chat)) == 2)
            assert recorder.seen == [("and this?", len(gif), "image/gif", "GIF", len(gif))]
            fake.send_photo(chat, 42, b"big", size=30 * 2**20)  # Telegram refuses files over 20 MB
            await fake.wait_until(lambda: len(fake.texts(chat)) == 3)
            assert fake.texts(chat)[2] == t("image_too_big", "en", size="30", limit="20")  # a clear message, no crash


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_webhook_mode_checks_the_secret_token(make_app):
    port = _free_port()
    url = f"http://127.0.0.1:{port}/tg-hook"
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(
            fake, telegram_webhook_url=url, telegram_webhook_listen="127.0.0.1", telegram_webhook_port=port,
            telegram_webhook_secret="s3cret-Value_1",
        ))
        async with running_bot(app):
            assert fake.webhook == {"url": url, "secret_token": "s3cret-Value_1", "allowed_updates": ["message", "callback_query"]}
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "ping")
            await fake.wait_until(lambda: has_final(fake, chat, "pong"))
            assert not any(method == "getUpdates" for _, method, _ in fake.calls)
            forged = {"update_id": 999, "message": {"message_id": 1, "date": 0, "text": "ping",
                                                    "chat": {"id": 42, "type": "private"}, "from": fake.users[42]}}
            async with aiohttp.ClientSession() as session:
                for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "wrong"}):
                    async with session.post(url, json=forged, headers=headers) as response:
                        assert response.status == 403
            assert fake.texts(chat) == ["pong"]  # a 403 is given only to what is never queued


async def test_shutdown_lets_answers_finish_or_closes_them_cleanly(make_app, monkeypatch):
    # However slow the machine, a stopped answer gets to close (no race against STOP_WAIT) ...
    monkeypatch.setattr("bot.app.STOP_WAIT", 3600.0)
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake, shutdown_grace=0.5), max_new_tokens=1800)
        # ... and the answer is still being generated when the grace ends, however fast the
        # machine (unslowed, a fast one wrote all 1800 tokens within it: a finished answer)
        await slow_down(app)
        async with running_bot(app) as adapter:
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "code")
            await fake.wait_until(lambda: any("print(" in m.text for m in fake.messages(chat)))
        assert adapter.task.done() and adapter.task.exception() is None
        last = fake.messages(chat)[-1]
        assert last.text.endswith(t("stopped_mark", "en"))  # cut by the shutdown, and says so
        assert all(not b.startswith("stop:") for m in fake.messages(chat) for b in fake.buttons(m))

    async with FakeTelegram(TOKEN) as fake:  # (the same DATA_DIR: another user, so no history)
        app = make_app(**telegram_settings(fake, shutdown_grace=3600.0))  # ... and a short one, to finish
        async with running_bot(app):
            chat = fake.private_chat(43)
            fake.send_text(chat, 43, "count")
            # the answer has begun ("typing…" shows only if its text does not come within 0.3 s)
            await fake.wait_until(lambda: fake.calls_of("sendChatAction") or fake.writes)
        assert fake.texts(chat) == [COUNT_ANSWER]  # finished within the grace period


async def test_a_whole_run_logs_no_token(make_app, tmp_path):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake, telegram_file_base_url=fake.file_base_url), log_level="DEBUG")
        log_file = setup_logging(app.settings)
        keep = Keep(level=logging.DEBUG)
        root.addHandler(keep)
        try:
            async with running_bot(app):
                chat = fake.private_chat(42)
                fake.fail_next("sendMessage", "429", retry_after=1, chat_id=chat)
                fake.send_text(chat, 42, "ping")
                await fake.wait_until(lambda: has_final(fake, chat, "pong"))
                fake.send_photo(chat, 42, b"img", size=30 * 2**20)
                await fake.wait_until(lambda: len(fake.texts(chat)) == 2)
                assert fake.calls_of("getFile") == []  # the declared size was checked first
        finally:
            for handler in list(root.handlers):
                root.removeHandler(handler)
                if handler not in saved[0]:
                    handler.close()
            for handler in saved[0]:
                root.addHandler(handler)
            root.setLevel(saved[1])
    text = log_file.read_text(encoding="utf-8")
    assert "429" in text or "retry after" in text  # the run did log its events
    assert TOKEN not in text and TOKEN.split(":")[1] not in text
    leaked = [(r.name, r.getMessage()[:300]) for r in records if TOKEN.split(":")[1] in r.getMessage()]
    assert leaked == []  # not even before redaction


async def test_the_real_process_serves_telegram_and_stops_cleanly_on_sigterm(tmp_path, tiny_chat_model, tiny_bajie_model):
    """`python -m launcher` with only the token (and the fake's URL) set: it answers, SIGTERM lets
    the answer in flight finish, the exit is clean, and neither its log nor stderr has the token."""
    import os
    import signal
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    async with FakeTelegram(TOKEN) as fake:
        env = {
            **os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TELEGRAM_BOT_TOKEN": TOKEN, "TELEGRAM_API_BASE_URL": fake.base_url,
            "CHAT_MODEL": str(tiny_chat_model), "BAJIE_MODEL": str(tiny_bajie_model), "DEVICE": "cpu",
            "TEMPERATURE": "0", "MAX_NEW_TOKENS": "64", "MAX_CONTEXT_TOKENS": "2048",
            "DATA_DIR": str(tmp_path / "data"), "LOG_LEVEL": "DEBUG",
            "METRICS_PORT": "",  # no status server: its fixed default port may be taken on a shared machine
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "launcher", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        exited = asyncio.create_task(process.wait())

        async def until(predicate) -> None:
            """Wait for the fake to see something, or fail at once (with its stderr) if the bot exits."""
            seen = asyncio.create_task(fake.wait_until(predicate))
            await asyncio.wait({seen, exited}, return_when=asyncio.FIRST_COMPLETED)
            if not seen.done():
                seen.cancel()
                raise AssertionError(f"the bot exited ({process.returncode}): {(await process.stderr.read()).decode()[-3000:]}")

        try:
            await until(lambda: fake.calls_of("getUpdates"))
            chat = fake.private_chat(42)
            fake.send_text(chat, 42, "ping")
            await until(lambda: has_final(fake, chat, "pong"))
            fake.send_text(chat, 42, "count")
            count_update = fake.updates[-1]["update_id"]
            # the bot has the question once it asks for the updates after it (typing is optional)
            await until(lambda: any(int(p.get("offset", 0) or 0) > count_update for p in fake.calls_of("getUpdates")))
            process.send_signal(signal.SIGTERM)
            out, err = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 0, err.decode()[-2000:]
        assert fake.texts(chat) == ["pong", COUNT_ANSWER]  # the answer in flight was finished
    log = (tmp_path / "data" / "bot.log").read_text(encoding="utf-8")
    assert "telegram: @InternLMTestBot is ready" in log and "telegram: stopped" in log
    secret = TOKEN.split(":")[1]
    assert secret not in log and secret not in err.decode() and secret not in out.decode()
