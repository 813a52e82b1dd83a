"""Issue 9's "nothing lost" fixes: empty answers, storage faults, one process per DATA_DIR,
adapter restarts, crash recovery on the platforms, buttons under older answers."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys

import pytest

from bot.i18n import t
from tests.bot_process import bot_argv, bot_env, finish, in_tmpfs, read_line, say, start
from tests.fake_telegram import FakeTelegram
from tests.telegram_harness import TOKEN, running_bot, telegram_settings
from tests.slow import slow_down
from tests.tiny_models import CODE_LINE

pytestmark = pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")


def app_incoming(chat: int, user: int):
    from bot.messages import Incoming

    return Incoming(platform="telegram", chat_id=str(chat), user_id=str(user))


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


# -- 7 and 9: DATA_DIR -------------------------------------------------------------------------


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


async def test_second_process_on_one_data_dir_exits_with_a_line_naming_it(tmp_path, tiny_chat_model, tiny_bajie_model):
    data = tmp_path / "data"
    env = bot_env(data, tiny_chat_model, tiny_bajie_model)
    first = await start(bot_argv("console"), env)
    try:
        await say(first, "ping")
        assert await read_line(first) == "pong"  # the first process is up and holds DATA_DIR
        second = await start(bot_argv("console"), env)
        code, out, err = await finish(second)
        assert code == 2 and out == ""
        line = one_error_line(err)
        assert line.startswith(f"error: DATA_DIR {data.resolve()} is in use by another bot process (pid {first.pid})")
        await say(first, "remember tiger")  # the first one still serves, its history untouched
        assert await read_line(first) == "OK"
    finally:
        code, _, err = await finish(first)
    assert code == 0, err
    third = await start(bot_argv("console"), env)  # the lock went with the first process
    await say(third, "recall")
    assert await read_line(third) == "tiger"
    assert (await finish(third))[0] == 0


@pytest.mark.parametrize(
    "options, before, cause",
    [
        ("size=1m", 'cat /dev/zero > "$DATA_DIR/fill" 2>/dev/null || true', "No space left on device"),
        ("ro,size=1m", "true", "Read-only file system"),
    ],
    ids=["full", "read-only"],
)
async def test_unusable_data_dir_at_start_is_one_line_naming_it(tmp_path, tiny_chat_model, tiny_bajie_model, options, before, cause):
    data = tmp_path / "data"
    proc = await start(in_tmpfs(data, bot_argv("console"), options=options, before=before), bot_env(data, tiny_chat_model, tiny_bajie_model))
    code, out, err = await finish(proc)
    assert code == 2 and out == ""
    line = one_error_line(err)
    assert line.startswith(f"error: DATA_DIR {data.resolve()} ") and line.endswith(cause), line


async def test_disk_filling_up_while_running_delivers_answers_says_unsaved_and_logs_once(tmp_path, tiny_chat_model, tiny_bajie_model):
    data = tmp_path / "data"
    proc = await start(in_tmpfs(data, bot_argv("console")), bot_env(data, tiny_chat_model, tiny_bajie_model, LOG_LEVEL="INFO"))
    try:
        await say(proc, "ping")
        assert await read_line(proc) == "pong"  # saved normally
        with open(f"/proc/{proc.pid}/root{data}/filler", "wb") as filler:  # the bot's tmpfs, seen from here
            with pytest.raises(OSError, match="No space left"):
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        for _ in range(3):
            await say(proc, "ping")
            assert await read_line(proc) == "pong"  # the answer is delivered…
            assert await read_line(proc) == ""
            assert await read_line(proc) == t("not_saved", "en")  # …and the user is told
        await say(proc, "/bajie")  # a command that writes: a clear notice, not "something went wrong"
        assert await read_line(proc) == t("greeting_bajie", "en")
    finally:
        code, out, err = await finish(proc)
    assert code == 0, err
    assert "Traceback" not in err and "Logging error" not in err, err
    assert err.count("history not saved") == 1, err  # once a minute, not once per failed write
    assert err.count("cannot write") <= 1, err


# -- 10: an adapter that dies is restarted; the others keep serving -----------------------------


async def test_discord_adapter_killed_by_a_malformed_event_restarts_while_telegram_serves(make_app, caplog):
    from launcher.cli import serve
    from tests.discord_harness import REGENERATE, answer_text, until_done
    from tests.fake_discord import FakeDiscord, patched

    async with FakeTelegram(TOKEN) as telegram, FakeDiscord() as discord:
        app = make_app(**telegram_settings(telegram), discord_bot_token=discord.token)
        stop = asyncio.Event()
        with patched(discord):
            serving = asyncio.create_task(serve(app.settings, ["telegram", "discord"], app=app, stop=stop))
            try:
                chat = telegram.private_chat(42)
                telegram.send_text(chat, 42, "ping")
                await telegram.wait_until(lambda: "pong" in telegram.texts(chat))
                await discord.wait_for(lambda: discord.identified, "the Discord adapter to connect")
                interaction = await discord.slash("chat", discord.alice, prompt="ping")
                (answer,) = await until_done(discord, interaction)
                regen = next(c for c in answer.custom_ids if c.startswith(REGENERATE))
                # discord.py raises KeyError on an interaction without attachment_size_limit
                await discord.press(answer, regen, discord.alice, omit=("attachment_size_limit",))
                await discord.wait_for(lambda: "discord adapter died (KeyError" in caplog.text, "the adapter to die")
                telegram.send_text(chat, 42, "/bajie ping")  # Telegram is served meanwhile
                await telegram.wait_until(lambda: "俺老猪听见了：pong" in telegram.texts(chat))
                await discord.wait_for(lambda: len(discord.identified) == 2, "a fresh Discord adapter")
                again = await discord.slash("chat", discord.alice, prompt="ping")
                assert answer_text(await until_done(discord, again)) == "pong"
                assert not serving.done()  # only SIGTERM/SIGINT ends the process
            finally:
                stop.set()  # like SIGTERM
                await serving
    assert caplog.text.count("discord adapter died") == 1


async def test_a_rejected_token_at_start_ends_the_process_with_one_line(tmp_path, tiny_chat_model, tiny_bajie_model):
    async with FakeTelegram(TOKEN) as telegram:
        env = bot_env(tmp_path / "data", tiny_chat_model, tiny_bajie_model, TELEGRAM_BOT_TOKEN="654321:WRONG-token-abcdefghijklmnopqrs",
                      TELEGRAM_API_BASE_URL=telegram.base_url, LOG_LEVEL="WARNING")
        proc = await start(bot_argv(), env)
        code, out, err = await finish(proc)
    assert code == 1, err
    assert err.strip().splitlines()[-1] == "error: Telegram rejected TELEGRAM_BOT_TOKEN (check it with @BotFather)"
    assert "Traceback" not in err and "WRONG-token" not in err


# -- 5: after kill -9, the cut answers are marked on the platform ---------------------------------


def answer_ids(data) -> list[int]:
    db = sqlite3.connect(data / "bot.sqlite3", timeout=30)
    try:
        return [row[0] for row in db.execute("SELECT id FROM messages WHERE role='assistant' ORDER BY id")]
    finally:
        db.close()


def saved_answers(data) -> list[tuple[str, str, str, str | None]]:
    """(session, content, status, reference) of every answer in the bot's database."""
    path = data / "bot.sqlite3"
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT session, content, status, reference FROM messages WHERE role='assistant' ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        db.close()


async def until(predicate, what: str) -> None:
    """Wait for a condition outside the fakes (the bot's database), re-checked every 50 ms. No
    deadline of its own (a busy machine only makes it slower); pytest-timeout ends a hang."""
    while not predicate():
        await asyncio.sleep(0.05)


def one_streaming_one_queued(data) -> bool:
    """Two answers stored with their platform message; the first has saved its first code line
    (its first save may hold only the opening fence: saves come every 2 s from the request, and a
    slow model load can put the first one at the very first token)."""
    rows = saved_answers(data)
    return (len(rows) == 2 and all(r[3] for r in rows) and all(r[2] == "streaming" for r in rows)
            and CODE_LINE.strip() in rows[0][1])


def run_bot_argv() -> list[str]:
    return [sys.executable, "-m", "tests.run_bot"]


async def kill_9(proc) -> None:
    proc.kill()
    assert await proc.wait() == -signal.SIGKILL


async def test_answers_cut_by_kill_9_are_marked_on_telegram_after_restart(tmp_path, tiny_chat_model, tiny_bajie_model):
    data = tmp_path / "data"
    async with FakeTelegram(TOKEN) as fake:
        env = bot_env(data, tiny_chat_model, tiny_bajie_model, TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_API_BASE_URL=fake.base_url)
        first = await start(run_bot_argv(), {**env, "MAX_NEW_TOKENS": "1500", "TEST_SECONDS_PER_TOKEN": "0.05"})
        try:
            alice, bob = fake.private_chat(42, lang="zh-hans"), fake.private_chat(43)
            fake.send_text(alice, 42, "code")
            await until(lambda: len(saved_answers(data)) == 1, "the first answer to start")
            fake.send_text(bob, 43, "code")  # queued behind it for the one model
            await until(lambda: one_streaming_one_queued(data), "both answers stored with their messages")
            await fake.wait_until(lambda: fake.messages(alice) and fake.messages(bob))
            assert fake.buttons(fake.messages(alice)[0])[0].startswith("stop:42:")
        finally:
            await kill_9(first)
        fake.delete_message(bob, fake.messages(bob)[0].message_id)  # bob deleted his: nothing to mark
        second = await start(run_bot_argv(), env)
        try:
            mark = t("interrupted_mark", "zh")
            await fake.wait_until(lambda: fake.messages(alice)[0].text.endswith(mark))
            (cut,) = fake.messages(alice)
            assert CODE_LINE.strip() in cut.text  # what was saved of it, then the mark
            assert fake.buttons(cut) == [f"regen:42:{answer_ids(data)[0]}"]  # Stop is gone
            saved = saved_answers(data)[0][1]
            assert cut.text.startswith(saved.replace("```python\n", "").splitlines()[0])
            await until(lambda: not any(r[3] for r in saved_answers(data)), "both answers handled")
            assert [r[2] for r in saved_answers(data)] == ["interrupted", "interrupted"]
            fake.press(alice, cut.message_id, 42)  # Regenerate works on the marked message
            await fake.wait_until(
                lambda: len(fake.messages(alice)) == 2 and fake.buttons(fake.messages(alice)[1])[:1] == [f"regen:42:{answer_ids(data)[-1]}"]
            )
        finally:
            second.send_signal(signal.SIGTERM)
            code, _, err = await finish(second)
        assert code == 0, err
    log = (data / "bot.log").read_text()
    assert "telegram: could not mark an interrupted answer" in log and "telegram: marked 1 answer(s)" in log


async def test_answers_cut_by_kill_9_are_marked_on_discord_after_restart(tmp_path, tiny_chat_model, tiny_bajie_model):
    from tests.discord_harness import REGENERATE, STOP
    from tests.fake_discord import FakeDiscord

    data = tmp_path / "data"
    async with FakeDiscord() as fake:
        env = bot_env(data, tiny_chat_model, tiny_bajie_model, DISCORD_BOT_TOKEN=fake.token,
                      FAKE_DISCORD_API=fake.api_base, FAKE_DISCORD_GATEWAY=fake.gateway_url)
        first = await start(run_bot_argv(), {**env, "MAX_NEW_TOKENS": "1500", "TEST_SECONDS_PER_TOKEN": "0.05"})
        bob = fake.add_user("bob")
        try:
            await fake.wait_for(lambda: fake.identified and fake.commands, "the bot to connect")
            alice_asks = await fake.slash("chat", fake.alice, prompt="code")
            await until(lambda: len(saved_answers(data)) == 1, "the first answer to start")
            bob_asks = await fake.slash("chat", bob, prompt="code")  # queued behind it
            await until(lambda: one_streaming_one_queued(data), "both answers stored with their messages")
            await fake.wait_for(lambda: alice_asks.original and any(c.startswith(STOP) for c in alice_asks.original.custom_ids))
        finally:
            await kill_9(first)
        bob_asks.expired = True  # like a token older than 15 minutes: this one cannot be edited any more
        second = await start(run_bot_argv(), env)
        try:
            mark = t("interrupted_mark", "en")
            await fake.wait_for(lambda: alice_asks.original.content.endswith(mark), "the cut answer to be marked")
            cut = alice_asks.original
            assert cut.content.startswith("-# ") and CODE_LINE.strip() in cut.content
            assert [c.split(":")[1] for c in cut.custom_ids] == ["regen"] and cut.custom_ids[0].startswith(REGENERATE)
            await until(lambda: not any(r[3] for r in saved_answers(data)), "both answers handled")
            assert not bob_asks.original.content.endswith(mark)
        finally:
            second.send_signal(signal.SIGTERM)
            code, _, err = await finish(second)
        assert code == 0, err
    log = (data / "bot.log").read_text()
    assert "discord: could not mark an interrupted answer (HTTPException: 401" in log and "discord: marked 1 answer(s)" in log


# -- 11: buttons under older answers and under queued answers -----------------------------------


async def test_regenerate_under_an_older_answer_says_only_the_latest_can_be(make_app):
    async with FakeTelegram(TOKEN) as fake:
        app = make_app(**telegram_settings(fake))
        async with running_bot(app):
            chat = fake.private_chat(42, lang="zh-hans")
            fake.send_text(chat, 42, "ping")
            await fake.wait_until(lambda: len(fake.messages(chat)) == 1 and fake.buttons(fake.messages(chat)[0]))
            fake.send_text(chat, 42, "remember tiger")
            await fake.wait_until(lambda: len(fake.messages(chat)) == 2 and fake.buttons(fake.messages(chat)[1]))
            older, latest = fake.messages(chat)
            key = app.session_key(app_incoming(chat, 42))
            before = [(m.role, m.content) for m in app.store.history(key, "internlm")]
            fake.press(chat, older.message_id, 42)
            await fake.wait_until(lambda: t("regenerate_only_latest", "zh") in fake.texts(chat))
            assert [(m.role, m.content) for m in app.store.history(key, "internlm")] == before  # nothing lost
            fake.press(chat, latest.message_id, 42)  # the latest one is regenerated: its question again
            await fake.wait_until(lambda: len(fake.messages(chat)) == 4 and fake.buttons(fake.messages(chat)[3]))
            assert fake.messages(chat)[3].text == "OK"
            assert [(m.role, m.content) for m in app.store.history(key, "internlm")] == before


async def test_stop_on_a_queued_answer_cancels_that_one_not_the_one_in_flight(make_app):
    from tests.discord_harness import STOP, key_of, stack

    def stop_button(interaction) -> tuple[object, str] | tuple[None, None]:
        """The Stop button of an answer, on its newest message (a long answer continues in follow-ups)."""
        for message in reversed(interaction.messages):
            for custom_id in message.custom_ids:
                if custom_id.startswith(STOP):
                    return message, custom_id
        return None, None

    async with stack(make_app, max_new_tokens=1500) as (fake, app, adapter):
        await slow_down(app, seconds_per_token=0.05)  # the test acts while the first answer streams
        first = await fake.slash("chat", fake.alice, prompt="code")
        await fake.wait_for(lambda: first.original and "print(" in first.original.content, "the first answer to stream")
        second = await fake.slash("chat", fake.alice, prompt="ping")  # waits for the first answer
        queued_notice = t("queued_session", "en")
        await fake.wait_for(lambda: second.original and second.original.content.endswith(queued_notice), "the queued notice")
        queued_message, stop_queued = stop_button(second)
        _, stop_running = stop_button(first)
        assert stop_queued is not None and stop_running is not None and stop_queued != stop_running
        await fake.press(queued_message, stop_queued, fake.alice)
        await fake.wait_for(lambda: second.original.content.endswith(t("stopped_mark", "en")), "the queued answer to stop")
        assert second.original.custom_ids == []  # nothing was asked: nothing to regenerate
        running_message, still = stop_button(first)
        assert still == stop_running  # the first answer still streams…
        assert not first.messages[-1].content.endswith(t("stopped_mark", "en"))
        await fake.press(running_message, stop_running, fake.alice)  # …and its own Stop stops it
        await fake.wait_for(lambda: first.messages[-1].content.endswith(t("stopped_mark", "en")), "the first answer to stop")
        key = app.session_key(key_of(fake, fake.alice, fake.channel))
        assert [m.content for m in app.store.history(key, "internlm") if m.role == "user"] == ["code"]


# -- 13: pictures kept across restarts; a forgotten one is said once --------------------------------


@pytest.fixture
def vision_app(make_app):
    from tests import tiny_vlm

    def make(**overrides):
        return make_app(vision_model=str(tiny_vlm.vision_model_path()), **overrides)

    return make


def photo_message(text: str = "", color: str | None = None, lang: str = "en"):
    from bot.messages import ImageAttachment, Incoming
    from tests import tiny_vlm
    from tests.test_images import encode

    image = None
    if color is not None:
        data = encode(tiny_vlm.solid_image(color, (64, 48)), "PNG")

        async def fetch() -> bytes:
            return data

        image = ImageAttachment(fetch=fetch, size=len(data), filename="photo.png", mime_type="image/png")
    return Incoming(platform="test", chat_id="c1", user_id="u1", text=text, image=image, language=lang)


async def said(app, text: str = "", color: str | None = None, lang: str = "en") -> list[str]:
    from tests.surfaces import RecordingSurface

    surface = RecordingSurface()
    await app.handle(photo_message(text, color, lang), surface)
    return [m for m in surface.messages if m]


async def test_a_picture_survives_a_restart_and_is_deleted_by_reset(vision_app, make_settings):
    first = vision_app()
    assert await said(first, "what is this", color="red") == ["red"]
    kept = sorted(p.suffix for p in (first.settings.data_dir / "pictures").iterdir())
    assert kept == [".json", ".png"]
    first.store.close()
    second = vision_app()  # a restart: same DATA_DIR, nothing in memory
    assert len(second.images) == 0
    assert await said(second, "And now?") == ["red"]  # the follow-up still has its picture
    assert second.hub.get("vision").last_prompt[1].image is not None
    assert await said(second, "/reset") == [t("reset_done", "en", persona=t("persona_vision", "en"))]
    assert list((second.settings.data_dir / "pictures").iterdir()) == []


async def test_a_forgotten_picture_is_said_once_and_the_chat_model_answers(vision_app):
    first = vision_app()
    assert await said(first, "what is this", color="blue", lang="zh") == ["blue"]
    first.store.close()
    for path in (first.settings.data_dir / "pictures").iterdir():
        path.unlink()  # expired while the bot was down
    second = vision_app()
    notice = t("picture_forgotten", "zh", persona=t("persona_internlm", "zh"))
    assert await said(second, "ping", lang="zh") == [notice, "pong"]
    assert await said(second, "ping", lang="zh") == ["pong"]  # said once: the chat model has the conversation now
    key = second.session_key(photo_message())
    assert second.current_persona(key).name == "internlm"


def test_kept_pictures_expire_and_stay_under_the_cap(tmp_path):
    import os
    import time

    from PIL import Image

    from bot.images import PreparedImage
    from bot.picture_files import PictureFiles

    def prepared(color: str) -> PreparedImage:
        return PreparedImage(Image.new("RGB", (40, 40), color), "PNG", (40, 40), 100, 1)

    files = PictureFiles(tmp_path / "pictures", max_bytes=10_000, idle_seconds=3600)
    files.save("a", "ta", prepared("red"))
    token, picture = files.load("a")
    assert token == "ta" and picture.image.getpixel((0, 0)) == (255, 0, 0) and picture.source_size == (40, 40)
    png, meta = files._paths("a")
    old = time.time() - 3601
    os.utime(png, (old, old))
    assert files.load("a") is None and not png.exists() and not meta.exists()  # expired: deleted
    files.save("b", "tb", prepared("red"))
    one = files._paths("b")[0].stat().st_size
    cap = PictureFiles(tmp_path / "capped", max_bytes=2 * one + one // 2, idle_seconds=3600)
    for i, key in enumerate("xyz"):
        cap.save(key, key, prepared("red"))
        stamp = time.time() - 100 + i  # x oldest
        for path in cap._paths(key):
            os.utime(path, (stamp, stamp))
    cap.save("w", "w", prepared("red"))
    assert [cap.load(k) is not None for k in "xyzw"] == [False, False, True, True]
