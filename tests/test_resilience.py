"""Issue 9's "nothing lost" fixes: empty answers, storage faults, one process per DATA_DIR,
adapter restarts, crash recovery on the platforms, buttons under older answers."""

from __future__ import annotations

import pytest

from bot.i18n import t
from tests.bot_process import bot_argv, bot_env, finish, in_tmpfs, read_line, say, start
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
